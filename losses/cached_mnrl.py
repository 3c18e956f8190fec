"""CachedMultipleNegativesRankingLoss (GradCache): in-batch negatives over a large batch in small mini-batches."""

import torch

from losses.mnrl import MultipleNegativesRankingLoss
from losses.params import check_params
from minilm.packing import split as split_packed

CITATION = """@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}"""


class RandomState:
    """The CPU and CUDA random states at one moment, to replay dropout exactly in the second pass."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class CachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """The MultipleNegativesRankingLoss of a whole batch, with memory that follows `mini_batch_size`.

    GradCache (Gao et al. 2021) in three steps:
    1. embed every mini-batch without building a graph (remembering the random state before each);
    2. compute the loss on those embeddings and its gradient with respect to each embedding (the cache);
    3. when backward() reaches the loss, embed each mini-batch again, this time with a graph, and push the
       cached gradient through it: parameter gradients equal the plain loss's, one mini-batch in memory at a time.
    Costs about one extra forward pass. Same inputs, arguments and result as MultipleNegativesRankingLoss.
    """

    citation = CITATION

    def __init__(self, model, scale: float = 20.0, similarity: str = "cos", symmetric: bool = False,
                 gather_across_devices: bool = False, mini_batch_size: int = 32, mask_duplicates: bool = True,
                 false_negative_margin=None):
        super().__init__(model, scale, similarity, symmetric, gather_across_devices, mask_duplicates,
                         false_negative_margin)
        check_params({"mini_batch_size": mini_batch_size})
        self.mini_batch_size = mini_batch_size

    def forward(self, features: list, labels=None, terms=None) -> torch.Tensor:
        """terms: None, or MatryoshkaLoss's terms (the loss at each of its dimensions): step 2 then takes each
        term's gradient on the cached embeddings, and step 3 replays the encoder once with their sum."""
        device = features[0]["input_ids"].device
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        pieces = [split_packed(batch, self.mini_batch_size) for batch in features]
        states = [[] for _ in features]
        with torch.no_grad():  # step 1
            embeddings = []
            for column, column_pieces in enumerate(pieces):
                outputs = []
                for piece in column_pieces:
                    states[column].append(RandomState(device))
                    outputs.append(self.model(piece))
                embeddings.append(torch.cat(outputs).float())
        leaves = [e.detach().requires_grad_() for e in embeddings]
        ids = self.text_ids(features)
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):  # step 2
            loss, cache = 0.0, [torch.zeros_like(leaf) for leaf in leaves]
            # One term's graph at a time (each holds a [B, C] score matrix), its gradient added to the cache.
            for term in (terms(leaves, labels, ids) if terms is not None
                         else [self.compute_loss_from_embeddings(leaves, labels, ids)]):
                for total, grad in zip(cache, torch.autograd.grad(term, leaves)):
                    total += grad
                loss = loss + term.detach()
        result = loss.detach().requires_grad_()
        result.register_hook(lambda grad: self._replay(pieces, states, cache, grad, autocast))  # step 3
        return result

    def _replay(self, pieces, states, cache, grad_output, autocast) -> None:
        device = pieces[0][0]["input_ids"].device
        enabled, dtype = autocast
        rng_now = RandomState(device)
        with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
            for column, column_pieces in enumerate(pieces):
                start = 0
                for piece, state in zip(column_pieces, states[column]):
                    state.restore()
                    output = self.model(piece)
                    rows = output.shape[0]
                    output.backward(cache[column][start:start + rows].to(output.dtype) * grad_output)
                    start += rows
        rng_now.restore()  # leave the random stream where the first pass left it

    def config(self) -> dict:
        return {**super().config(), "mini_batch_size": self.mini_batch_size}
