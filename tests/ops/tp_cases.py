"""What the TP=2-equals-TP=1 workers of the log-prob ops share (run inside tests/multiprocess.py ranks):
counting the all-reduces one op call makes, and the target ids every vocab-parallel case must handle."""
import torch


def record_all_reduces() -> list:
    """Wrap torch.distributed.all_reduce in this process; every call appends its tensor's shape to the
    returned list, so a worker counts the all-reduces of one op call as the list's growth."""
    import torch.distributed as dist

    calls = []
    real_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *a, **kw):
        calls.append(tuple(tensor.shape))
        return real_all_reduce(tensor, *a, **kw)

    dist.all_reduce = recording_all_reduce
    return calls


def plant_edge_targets(targets: torch.Tensor, valid_vocab: int, vocab_local: int) -> torch.Tensor:
    """In place, on [s, b] targets: [0, 0] is ignore_index (-100), [1, 1] the first id past the valid
    vocabulary (padding: ignored too; both must give 0), and [2, 0] a column of rank 1's shard when that
    shard holds valid ids, so the target's owner is not always rank 0."""
    targets[0, 0] = -100
    targets[1, 1] = valid_vocab
    targets[2, 0] = vocab_local + 3 if valid_vocab > vocab_local + 3 else 3
    return targets
