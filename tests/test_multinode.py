"""Several machines without a shared file system, as two one-process "nodes" on 127.0.0.1.

Each node is its own `torchrun --nnodes=2 --node_rank=N` with its own run folder; gloo stands in for
NCCL. Rank 0 reads the checkpoint a run resumes from and sends it to the other ranks, so node 1
resumes whether its folder is empty or holds an older copy of the run, and ends with the weights of
a resume from one shared folder; an error on rank 0 is raised on every rank. On the in-memory path
rank 0 alone trains the tokenizer. Counted inside the ranks
(`tests/multinode_worker.py`): each step waits for the device once, runs one collective of host
numbers, and has the next step's batches built before it waits.

With fakes for the ranks of one machine: the other local ranks map the prepared folder that local
rank 0 has checked without hashing it again, and a prepared hub corpus is not loaded to be
fingerprinted.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONFIG, ROOT, TIMEOUT, assert_same_tensors, free_port, overrides

from transformer.checkpoint import CheckpointError, load_checkpoint, run_checkpoints
from transformer.config import load_config
from transformer.data import prepare as prepare_module
from transformer.data.batches import DataError
from transformer.data import prepared as prepared_module
from transformer.training.distributed import Ranks
from transformer.training.run_data import prepare_data, training_data_fingerprint

WORKER = ROOT / "tests" / "multinode_worker.py"
SAVE_EVERY, FIRST, SECOND = 4, 8, 16  # the run trains to FIRST steps, and is resumed to SECOND
CHANGES = {"train_save_every": SAVE_EVERY, "train_eval_every": 1000, "train_eval_bleu_sentences": 0,
           "train_log_every": SAVE_EVERY, "train_keep_last": 2, "train_average_last": 1}


def run_nodes(corpus: Path, run_dirs: list[Path], record_dir: Path, *extra: str, **changes) -> list[subprocess.CompletedProcess]:
    """Run the two nodes, node N training into `run_dirs[N]`; each rank's record goes to `record_dir`."""
    record_dir.mkdir(parents=True, exist_ok=True)
    port, started = free_port(), []
    for node, run_dir in enumerate(run_dirs):
        # What `torchrun --nnodes=2 --node_rank=N --nproc_per_node=1` gives its one process.
        launch = {"RANK": node, "GROUP_RANK": node, "LOCAL_RANK": 0, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 1,
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RECORD_DIR": record_dir}
        command = [sys.executable, str(WORKER), "--config", str(CONFIG), *extra,
                   *overrides(corpus, run_dir, **{**CHANGES, **changes})]
        started.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **{k: str(v) for k, v in launch.items()}}))
    done = []
    try:
        for process in started:
            _, err = process.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(process.args, process.returncode, "", err))
    finally:
        for process in started:  # a node left waiting for the other, which has stopped
            process.kill()
            process.wait()
    return done


def records(record_dir: Path) -> list[dict]:
    return [json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory) -> Path:
    """Both nodes trained FIRST steps of a new run into one folder, RUN/shared (checkpoints at every
    SAVE_EVERY steps); the ranks' records are in RUN/record."""
    root = tmp_path_factory.mktemp("multinode")
    for process in run_nodes(corpus, [root / "shared"] * 2, root / "record", train_max_steps=FIRST):
        assert process.returncode == 0, process.stderr[-5000:]
    return root


def test_rank_0_alone_trains_the_tokenizer_of_the_in_memory_path(first_run):
    rank0, rank1 = records(first_run / "record")
    assert (rank0["tokenizer_trainings"], rank1["tokenizer_trainings"]) == (1, 0)


def test_each_step_waits_once_runs_one_host_collective_and_has_the_next_batches_built(first_run):
    for rank in records(first_run / "record"):
        steps = {s["step"]: s for s in rank["steps"]}
        assert sorted(steps) == list(range(1, FIRST + 1))
        for n in range(1, FIRST):
            # The step's batches and the next step's were built when the step waited for the device.
            assert steps[n]["built_at_read"] == n + 1, steps[n]
            if n > 1 and n % SAVE_EVERY:  # DDP sets up its buckets in step 1; saving gathers random states
                # One read (the summed loss and gradient norm); one collective of device tensors
                # (their sum) and one of host numbers (token counts, budget, stop flags).
                assert steps[n]["reads"] == {"tolist": 1}, steps[n]
                assert steps[n]["collectives"] == {"all_reduce": 1, "all_gather": 1}, steps[n]


def test_node_1_resumes_from_rank_0s_checkpoint_with_an_empty_or_a_stale_folder(corpus, first_run, tmp_path):
    shared = first_run / "shared"
    folders = {"shared": [tmp_path / "shared"] * 2,
               "empty": [tmp_path / "node0_of_empty", tmp_path / "empty_on_node1"],
               "stale": [tmp_path / "node0_of_stale", tmp_path / "stale_on_node1"]}
    for run_dirs in folders.values():
        shutil.copytree(shared, run_dirs[0])
    # An older copy of the run on node 1: its newest checkpoint is from SAVE_EVERY steps earlier.
    stale = folders["stale"][1]
    shutil.copytree(shared, stale)
    run_checkpoints(stale)[-1].unlink()
    stale_files = sorted(p.relative_to(stale) for p in stale.rglob("*"))

    for name, run_dirs in folders.items():
        done = run_nodes(corpus, run_dirs, tmp_path / f"record_{name}", "--resume", train_max_steps=SECOND)
        for process in done:
            assert process.returncode == 0, f"{name}: {process.stderr[-5000:]}"
        rank0, rank1 = records(tmp_path / f"record_{name}")
        assert (rank0["checkpoint_reads"], rank1["checkpoint_reads"]) == (1, 0), name
        assert [s["step"] for s in rank1["steps"]] == list(range(FIRST + 1, SECOND + 1)), name

    # Node 1 wrote nothing: its empty folder was not created, its stale one is as it was.
    assert not folders["empty"][1].exists()
    assert sorted(p.relative_to(stale) for p in stale.rglob("*")) == stale_files
    name = f"step_{SECOND:08d}.pt"
    expected = load_checkpoint(folders["shared"][0] / "checkpoints" / name)
    for case in ("empty", "stale"):
        state = load_checkpoint(folders[case][0] / "checkpoints" / name)
        for key in ("model", "optimizer", "rng", "scaler"):
            assert_same_tensors(state[key], expected[key], f"{case}/{key}")
        assert {k: v for k, v in state["position"].items() if k != "elapsed"} == \
            {k: v for k, v in expected["position"].items() if k != "elapsed"}


class Rank(Ranks):
    """Rank `rank` of two whose broadcasts carry what rank 0 sent (`sent`, pickled as the wire would)."""

    def __init__(self, rank: int, sent: list) -> None:
        super().__init__(rank, 2)
        self.sent = sent

    def share_from_main(self, obj):
        if self.rank == 0:
            self.sent.append(pickle.dumps(obj))
            return obj
        return pickle.loads(self.sent[-1])


def test_what_rank_0_computes_or_the_error_it_raises_reaches_every_rank():
    sent: list = []
    tensors = {"weights": torch.arange(6.0).reshape(2, 3), "step": 7}
    assert Rank(0, sent).from_main(lambda: tensors) is tensors
    received = Rank(1, sent).from_main(lambda: pytest.fail("only rank 0 computes"))
    assert_same_tensors(received, tensors)

    def refuse():
        raise CheckpointError("run/checkpoints/step_8.pt: resuming would change model.d_ff (64 -> 128)")

    errors = []
    for rank in (0, 1):
        with pytest.raises(CheckpointError) as error:
            Rank(rank, sent).from_main(refuse)
        errors.append(str(error.value))
    assert errors[0] == errors[1] and "model.d_ff" in errors[0]


# ---------------------------------------------------------------------------------------------
# The ranks of one machine, with fakes for the process group
# ---------------------------------------------------------------------------------------------

def act_as_local_rank_1(monkeypatch) -> None:
    """Make this process local rank 1 of a machine whose process group exists; barriers return at once."""
    import torch.distributed as dist
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: None)
    monkeypatch.setattr(dist, "barrier", lambda group=None: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: None)


def test_the_other_local_ranks_map_the_checked_folder_without_hashing_it(corpus, tmp_path, monkeypatch):
    cfg = load_config(CONFIG, overrides(corpus, tmp_path / "run", tokenizer_cache_dir=tmp_path / "tokenizers")
                      + [f"data.prepared_dir={tmp_path / 'prep'}"])
    prepare_module.prepare(cfg)  # what local rank 0 has prepared and checked before the barrier
    act_as_local_rank_1(monkeypatch)
    hashed = []
    sha256 = prepared_module.file_sha256
    monkeypatch.setattr(prepared_module, "file_sha256", lambda path: hashed.append(path) or sha256(path))
    data, tokenizers = prepare_module.ensure_prepared(cfg)
    assert len(data) > 0 and hashed == []
    (tmp_path / "prep" / "train.src.bin").write_bytes(b"")  # sizes are still checked
    with pytest.raises(DataError, match="train.src.bin has 0 bytes"):
        prepare_module.ensure_prepared(cfg)


def test_a_prepared_hub_corpus_is_named_not_loaded_to_check_the_folder_and_fingerprint_the_run(corpus, tmp_path,
                                                                                            monkeypatch):
    import datasets
    src = (corpus / "train.de").read_text(encoding="utf-8").splitlines()
    tgt = (corpus / "train.en").read_text(encoding="utf-8").splitlines()
    table = datasets.Dataset.from_dict({"translation": [{"de": s, "en": t} for s, t in zip(src, tgt)]})
    loads = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: loads.append(split) or table)
    hub = overrides(tmp_path / "absent", tmp_path / "run", data_hub_name="wmt14",
                    tokenizer_cache_dir=tmp_path / "tokenizers")
    cfg = load_config(CONFIG, hub + ["data.hub_field=translation", f"data.prepared_dir={tmp_path / 'prep'}"])
    prepare_module.prepare(cfg)
    assert loads == ["train"]
    loads.clear()
    _, _, data, _, _ = prepare_data(cfg, tmp_path / "run", None)  # checks the folder, loads the validation split
    assert loads == [cfg.data.hub_valid_split]
    assert training_data_fingerprint(cfg, data) == [{"hub": "wmt14", "config": cfg.data.hub_config, "split": "train",
                                                     "fingerprint": table._fingerprint}]
    # Another dataset name is another corpus: the folder is stale.
    other = load_config(CONFIG, hub + ["data.hub_field=translation", "data.hub_name=wmt16",
                                       f"data.prepared_dir={tmp_path / 'prep'}"])
    assert "hub dataset 'wmt16' changed" in prepare_module.stale_reason(other, load_hub=False)
