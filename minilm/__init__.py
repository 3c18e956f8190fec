"""minilm: readable sentence-embedding fine-tuning around all-MiniLM-L6-v2, in plain PyTorch.

    import minilm
    model = minilm.load("sentence-transformers/all-MiniLM-L6-v2")
    embeddings = model.encode(["A man is eating food.", "Someone eats."])
    print(model.similarity(embeddings, embeddings))
"""

from minilm import onednn  # noqa: F401  (first: bounds oneDNN's primitive caches before oneDNN first runs)
from minilm.errors import InputError
from minilm.model import SentenceEncoder, batch_to, load
from minilm.similarity_search import search

__version__ = "0.1.0"
__all__ = ["InputError", "SentenceEncoder", "batch_to", "load", "search", "__version__"]
