"""Training-side reading of a pair pack: dataset, data-parallel batch sampler, collation."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .indexed import PackFormatError, read_index
from .pack import FORMAT_NAME, FORMAT_VERSION, SEQUENCES_PER_PAIR, pack_fingerprint


class TokenizerMismatchError(ValueError):
    """The pack was tokenised with another tokenizer than the one training uses."""


def _strip_prefix(path: str) -> str:
    for ext in (".manifest.json", ".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


class PairDataset:
    """A packed pair dataset: `<prefix>.bin`, `<prefix>.idx`, `<prefix>.manifest.json`.

    Opening validates the index (magic, version, dtype, sizes, pointers, document layout), the data
    file's size, the manifest's format/version, counts and .idx checksum, and (if given) the tokenizer
    hash, raising PackFormatError / TokenizerMismatchError with the file named.
    `verify_data=True` also checks the .bin's sha256 (reads the whole file).
    """

    def __init__(self, path_prefix: str, expected_tokenizer_hash: Optional[str] = None,
                 verify_data: bool = False):
        prefix = _strip_prefix(path_prefix)
        self.path_prefix = prefix
        bin_path, idx_path, man_path = prefix + ".bin", prefix + ".idx", prefix + ".manifest.json"
        if not os.path.exists(man_path):
            raise PackFormatError(f"pack manifest not found: {man_path} (write packs with tools/pack_pairs.py)")
        try:
            with open(man_path) as f:
                manifest = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise PackFormatError(f"{man_path}: corrupt manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise PackFormatError(f"{man_path}: not a {FORMAT_NAME} manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise PackFormatError(f"{man_path}: format version {manifest.get('format_version')} is not "
                                  f"supported (this reader reads version {FORMAT_VERSION}); re-pack the data")
        self.manifest: dict = manifest
        index = read_index(idx_path, bin_path)
        if index.dtype.name != manifest.get("dtype"):
            raise PackFormatError(f"{idx_path}: dtype {index.dtype.name} but the manifest says {manifest.get('dtype')}")
        nseq = index.lengths.size
        n = len(index.document_indices) - 1
        if nseq != SEQUENCES_PER_PAIR * n or not np.array_equal(
                index.document_indices, SEQUENCES_PER_PAIR * np.arange(n + 1)):
            raise PackFormatError(f"{idx_path}: not a pair pack (expected {SEQUENCES_PER_PAIR} sequences "
                                  f"per document)")
        if n != manifest.get("num_pairs"):
            raise PackFormatError(f"{idx_path}: {n} pairs but the manifest says {manifest.get('num_pairs')}")
        files = manifest.get("files", {})
        idx_sha = hashlib.sha256(index.raw).hexdigest()
        if files.get("idx", {}).get("sha256") not in (None, idx_sha):
            raise PackFormatError(f"{idx_path}: checksum differs from the manifest's (index replaced or corrupt)")
        if verify_data:
            h = hashlib.sha256()
            with open(bin_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            if h.hexdigest() != files.get("bin", {}).get("sha256"):
                raise PackFormatError(f"{bin_path}: checksum differs from the manifest's (corrupt data)")
        self.tokenizer_hash: str = manifest["tokenizer_hash"]
        if expected_tokenizer_hash is not None and expected_tokenizer_hash != self.tokenizer_hash:
            raise TokenizerMismatchError(
                f"{man_path} was packed with tokenizer {self.tokenizer_hash[:16]}… "
                f"({manifest.get('tokenizer', {}).get('path')}) but training uses {expected_tokenizer_hash[:16]}…; "
                f"re-pack with the model's tokenizer")
        self.fingerprint: str = pack_fingerprint(self.tokenizer_hash, files.get("bin", {}).get("sha256", ""), idx_sha,
                                                 manifest.get("options", {}).get("chat_template_mode"))
        if manifest.get("fingerprint") not in (None, self.fingerprint):
            raise PackFormatError(f"{man_path}: fingerprint does not match the files")
        self.dtype = index.dtype
        self._seq_lengths = index.lengths.astype(np.int64).reshape(n, SEQUENCES_PER_PAIR)
        self._starts = (index.pointers // index.dtype.itemsize).reshape(n, SEQUENCES_PER_PAIR)
        self._bin = (np.memmap(bin_path, dtype=index.dtype, mode="r") if os.path.getsize(bin_path)
                     else np.zeros(0, index.dtype))
        self._lengths = self._seq_lengths[:, 0] + self._seq_lengths[:, 1:].max(axis=1)

    def check_token_ids(self, vocab_size: int, block_tokens: int = 1 << 24) -> None:
        """Raise PackFormatError if any token id is negative or >= vocab_size (the model's vocabulary).

        Vectorised over the memory-mapped .bin in blocks (16 Mi tokens: ~0.05 s each), so a pack
        packed with another tokenizer, or a flipped byte, is an error naming the pair instead of an
        IndexError (or silently wrong embeddings) mid-training."""
        data = self._bin
        for start in range(0, data.size, block_tokens):
            block = np.asarray(data[start:start + block_tokens])
            bad = (block >= vocab_size) if block.dtype.kind == "u" else ((block < 0) | (block >= vocab_size))
            if bad.any():
                pos = start + int(np.argmax(bad))
                pair = int(np.searchsorted(self._starts[:, 0], pos, side="right")) - 1
                raise PackFormatError(
                    f"{self.path_prefix}.bin: token id {int(data[pos])} at token {pos} (pair {pair}) is outside "
                    f"the model's vocabulary of {vocab_size}; the data file is corrupt or was packed with another "
                    "tokenizer (re-pack it)")

    # DataLoader workers: pickle the path, not the memory map, and reopen (and re-validate) on arrival.
    def __getstate__(self):
        return {"path_prefix": self.path_prefix, "tokenizer_hash": self.tokenizer_hash}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"], expected_tokenizer_hash=state["tokenizer_hash"])

    # ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._seq_lengths.shape[0]

    def pair(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt, chosen response + EOS, rejected response + EOS) token ids of pair i."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair {i} out of range for {n} pairs")
        s, l = self._starts[i], self._seq_lengths[i]
        return tuple(np.asarray(self._bin[s[k]: s[k] + l[k]]) for k in range(SEQUENCES_PER_PAIR))

    __getitem__ = pair

    def lengths(self) -> np.ndarray:
        """Per pair: max(len(prompt + chosen), len(prompt + rejected))."""
        return self._lengths

    def sequence_lengths(self) -> np.ndarray:
        """[num_pairs, 3] lengths of (prompt, chosen, rejected)."""
        return self._seq_lengths

    @property
    def eos_token_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_token_id"])

    @property
    def pad_token_id(self) -> int:
        return int(self.manifest["tokenizer"]["pad_token_id"])

    def __repr__(self) -> str:
        return f"PairDataset({self.path_prefix!r}, pairs={len(self)}, fingerprint={self.fingerprint[:12]})"


class PairBatchSampler:
    """Deterministic, resumable, data-parallel sampler of pair indices.

    Each optimizer step takes `global_batch_size = micro_batch_size * num_micro_batches * dp_size`
    pairs from the epoch's order (a permutation seeded by (seed, epoch) when `shuffle`). Iterating
    yields, per step, this rank's `num_micro_batches` lists of `micro_batch_size` pair indices; the
    ranks' shares of a step are disjoint and together are the whole global batch.

    With `bucket_by_length`, the step's pairs are sorted by length and cut into micro-batches, so
    every micro-batch holds pairs of similar length (less padding) and at micro-step m all ranks get
    neighbouring lengths (balanced ranks); the micro-steps' order is then shuffled (seeded), so loss
    statistics updated per micro-batch (SPoT-BCO's delta) see no length trend. The step's set of
    pairs is the same as without bucketing. `bucket_window_steps > 1` sorts across that many steps
    first (less padding still, but steps then group similar lengths) and shuffles the steps' order.

    `drop_last=True` drops the epoch's last partial global batch; `False` completes it with pairs
    from the start of the epoch's order. The sampler counts consumed steps: `state_dict()` taken after
    k steps and `load_state_dict` make a new sampler yield exactly the remaining steps. Finishing an
    epoch's iteration advances to the next epoch; `set_epoch(e)` jumps to epoch e (keeping the position
    if e is the current epoch, so calling it after a resume is safe).
    """

    def __init__(self, dataset_lengths, micro_batch_size: int, num_micro_batches: int, dp_rank: int,
                 dp_size: int, seed: int = 1234, shuffle: bool = True, bucket_by_length: bool = True,
                 drop_last: bool = True, bucket_window_steps: int = 1):
        self.lengths = np.asarray(dataset_lengths, dtype=np.int64).reshape(-1)
        if micro_batch_size < 1 or num_micro_batches < 1 or dp_size < 1 or bucket_window_steps < 1:
            raise ValueError("micro_batch_size, num_micro_batches, dp_size and bucket_window_steps must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.micro_batch_size = int(micro_batch_size)
        self.num_micro_batches = int(num_micro_batches)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.bucket_by_length = bool(bucket_by_length)
        self.drop_last = bool(drop_last)
        self.bucket_window_steps = int(bucket_window_steps)
        self.global_batch_size = self.micro_batch_size * self.num_micro_batches * self.dp_size
        n = self.lengths.size
        if n == 0 or (self.drop_last and n < self.global_batch_size):
            raise ValueError(f"{n} pairs are fewer than one global batch of {self.global_batch_size} "
                             f"(micro_batch_size x num_micro_batches x dp_size)")
        self.epoch = 0
        self.step = 0
        self._plan_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        n, g = self.lengths.size, self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def _rng(self, epoch: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, purpose])

    def plan(self, epoch: int) -> np.ndarray:
        """All ranks' indices for an epoch: [steps, num_micro_batches, dp_size, micro_batch_size]."""
        if self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        n, g, steps = self.lengths.size, self.global_batch_size, len(self)
        order = self._rng(epoch, 0).permutation(n) if self.shuffle else np.arange(n)
        if steps * g > n:   # drop_last=False: complete the last batch from the start of the order
            order = np.concatenate([order] + [order] * ((steps * g - n) // n + 1))
        order = order[: steps * g].reshape(steps, g)
        nm, dp, mb = self.num_micro_batches, self.dp_size, self.micro_batch_size
        if self.bucket_by_length:
            w = self.bucket_window_steps
            if w > 1:
                rng = self._rng(epoch, 1)
                for s in range(0, steps, w):
                    block = order[s:s + w].reshape(-1)
                    block = block[np.argsort(self.lengths[block], kind="stable")]
                    block = block.reshape(-1, g)[rng.permutation(block.size // g)]
                    order[s:s + w] = block
            order = np.take_along_axis(order, np.argsort(self.lengths[order], axis=1, kind="stable"), axis=1)
            plan = order.reshape(steps, nm, dp, mb)
            rng = self._rng(epoch, 2)
            plan = np.stack([plan[s, rng.permutation(nm)] for s in range(steps)]) if steps else plan
        else:
            plan = order.reshape(steps, nm, dp, mb)
        self._plan_cache = (epoch, plan)
        return plan

    def __iter__(self) -> Iterator[List[List[int]]]:
        epoch = self.epoch
        plan = self.plan(epoch)
        for s in range(self.step, plan.shape[0]):
            self.step = s + 1   # counted as consumed once handed out
            yield [plan[s, m, self.dp_rank].tolist() for m in range(self.num_micro_batches)]
        if self.epoch == epoch:
            self.epoch, self.step = epoch + 1, 0

    def iter_epochs(self, num_epochs: int) -> Iterator[Tuple[int, int, List[List[int]]]]:
        """Yield (epoch, step_in_epoch, micro_batches) from the current position up to num_epochs."""
        while self.epoch < num_epochs:
            epoch = self.epoch
            for mbs in self:
                yield epoch, self.step - 1, mbs

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.step = int(epoch), 0

    def _config(self) -> dict:
        return {"num_pairs": int(self.lengths.size), "micro_batch_size": self.micro_batch_size,
                "num_micro_batches": self.num_micro_batches, "dp_size": self.dp_size, "seed": self.seed,
                "shuffle": self.shuffle, "bucket_by_length": self.bucket_by_length,
                "drop_last": self.drop_last, "bucket_window_steps": self.bucket_window_steps,
                "lengths_sha256": hashlib.sha256(self.lengths.tobytes()).hexdigest()[:16]}

    def state_dict(self) -> dict:
        return {"version": 1, "epoch": self.epoch, "step": self.step, "config": self._config()}

    def load_state_dict(self, sd: dict) -> None:
        mine = self._config()
        diff = {k: (sd["config"].get(k), v) for k, v in mine.items() if sd["config"].get(k) != v}
        if diff:
            raise ValueError("sampler state does not match this sampler (saved, now): "
                             + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in diff.items()))
        self.epoch, self.step = int(sd["epoch"]), int(sd["step"])


def collate_pairs(dataset: PairDataset, indices: Sequence[int], pad_token_id: int, pad_to_multiple_of: int = 1,
                  max_length: Optional[int] = None) -> Dict[str, "torch.Tensor"]:
    """Batch B pairs into 2B right-padded rows: [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}].

    Each row is prompt + response. Returns int64 `tokens`, `labels` (tokens shifted left; last = pad),
    `position_ids`, float32 `loss_mask` (1 where labels[j] is a response token, EOS included),
    `pair_indices` [B], and `prompt_lengths` / `sequence_lengths` [2B]. With `max_length`, rows longer
    than it keep the response's start and the prompt's end (at least one response token).
    """
    import torch

    rows = []
    for i in indices:
        p, c, r = dataset.pair(int(i))
        rows.append((p, c))
    for k, i in enumerate(indices):
        rows.append((rows[k][0], dataset.pair(int(i))[2]))
    fitted = []
    for p, resp in rows:
        if max_length and len(p) + len(resp) > max_length:
            keep = min(len(resp), max(max_length - len(p), 1))
            resp = resp[:keep]
            p = p[len(p) - (max_length - keep):] if max_length - keep > 0 else p[:0]
        fitted.append((p, resp))
    longest = max(len(p) + len(r) for p, r in fitted)
    m = max(int(pad_to_multiple_of), 1)
    L = -(-longest // m) * m
    n = len(fitted)
    tokens = np.full((n, L), pad_token_id, dtype=np.int64)
    labels = np.full((n, L), pad_token_id, dtype=np.int64)
    mask = np.zeros((n, L), dtype=np.float32)
    plen = np.zeros(n, np.int64)
    slen = np.zeros(n, np.int64)
    for j, (p, resp) in enumerate(fitted):
        lp, t = len(p), len(p) + len(resp)
        tokens[j, :lp] = p
        tokens[j, lp:t] = resp
        labels[j, : t - 1] = tokens[j, 1:t]
        mask[j, max(lp - 1, 0): t - 1] = 1.0
        plen[j], slen[j] = lp, t
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(mask),
        "position_ids": torch.arange(L, dtype=torch.int64).unsqueeze(0).expand(n, L).contiguous(),
        "pair_indices": torch.as_tensor(np.asarray(indices, dtype=np.int64)),
        "prompt_lengths": torch.from_numpy(plen),
        "sequence_lengths": torch.from_numpy(slen),
    }
