"""Encode sentences and print their cosine similarities:  python -m minilm "A man eats." "Someone is eating."
"""

import argparse

import minilm

EXAMPLES = ["A man is eating food.", "Someone is having a meal.", "A man is riding a horse.",
            "The stock market fell sharply today."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sentences", nargs="*", help=f"sentences to compare (default: {len(EXAMPLES)} examples)")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="directory or hub id")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    sentences = args.sentences or EXAMPLES
    model = minilm.load(args.model, device=args.device)
    embeddings = model.encode(sentences)
    print(f"{args.model}: {len(sentences)} sentences -> {embeddings.shape[1]}-d embeddings "
          f"(device {model.device}, attention backend {model.attention_backend or 'auto'})\n")
    similarities = model.similarity(embeddings, embeddings)
    for i, sentence in enumerate(sentences):
        print(f"[{i}] {sentence}")
    print("\ncosine similarity\n      " + "".join(f"[{j}]    " for j in range(len(sentences))))
    for i, row in enumerate(similarities.tolist()):
        print(f"[{i}]  " + "".join(f"{value:6.3f} " for value in row))


if __name__ == "__main__":
    main()
