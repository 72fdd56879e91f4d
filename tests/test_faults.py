"""Faults (issue 16): full disks, two writers on one run folder, outputs over inputs, resumes with
other arguments, and a run killed mid-state.

Through the CLI where a user meets them: exit code 2, one `error:` line, no traceback, and the
files already there intact.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HOLD_FOLDER, file_held, held_by_another_process, tiny
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact import output_folder
from vitcompact.cli.app import app
from vitcompact.errors import ArtifactError, ConfigError
from vitcompact.io import write_json
from vitcompact.pruning.configs import RSSTConfig, RunFolder
from vitcompact.pruning.loop import prune
from vitcompact.training import TrainConfig

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# A tiny pruning run of the digits preset (seconds), with its first state checkpointed.
PRUNE = ["prune", "vit-digits", "--data", "digits", "--head-ratio", "0.5", "--mlp-ratio", "0.5",
         "--finetune-epochs", "3", "--batch-size", "128",
         "--precision", "fp32", "--json"]


def refused(args: list, expected: str) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes; the lock file (a writer's PID) aside."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != output_folder.LOCK_FILE}


def tensors_equal(a: Path, b: Path) -> list[str]:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return [k for k in ta if not torch.equal(ta[k], tb[k])]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("faults") / "dense"
    vc.save(vc.create_model("vit-digits", depth=2), path)
    return path


# ---------------------------------------------------------------- one writer per folder

@pytest.fixture
def held(tmp_path):
    """A run folder whose lock another process holds; yields (folder, that process)."""
    folder = tmp_path / "run"
    with held_by_another_process(folder, HOLD_FOLDER) as holder:
        yield folder, holder


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_writer_is_refused_naming_the_holder(held, resume):
    folder, holder = held
    before = snapshot(folder)
    refused([*PRUNE, "--out", folder, *(["--resume"] if resume else [])],
            f"{folder} is in use by another vitcompact process (PID {holder.pid})")
    assert snapshot(folder) == before


def test_train_compact_and_pipeline_take_the_same_lock(held, artifact):
    folder, holder = held
    refused(["train", "vit-digits", "--data", "digits", "--epochs", "1", "--out", folder], f"(PID {holder.pid})")
    refused(["compact", artifact, "--out", folder], f"(PID {holder.pid})")
    refused(["pipeline", "--out", folder], f"(PID {holder.pid})")
    assert output_folder.contents(folder) == []


def test_the_lock_goes_with_its_process(held):
    folder, holder = held
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with output_folder.lock(folder) as locked:
        assert locked == folder
        with output_folder.lock(folder):  # re-entrant within a process
            pass
        assert (folder / output_folder.LOCK_FILE).read_text() == f"{os.getpid()}\n"


# ---------------------------------------------------------------- outputs and inputs

def test_compact_refuses_a_non_empty_out_unless_overwrite(artifact, tmp_path):
    out = tmp_path / "compact"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    refused(["compact", artifact, "--out", out], f"--out {out} already exists and is not empty; pass --overwrite")
    assert (out / "config.json").read_text() == '{"mine": true}'
    result = runner.invoke(app, ["compact", str(artifact), "--out", str(out), "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert vc.load(out).blocks[0].mlp.fc1.out_features == 128  # nothing was masked


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_compact_never_writes_over_its_input(artifact, overwrite):
    before = snapshot(artifact)
    refused(["compact", artifact, "--out", artifact, *overwrite], f"--out {artifact} would write over the input {artifact}")
    masks = artifact.parent / "masked"
    vc.save(vc.load(artifact), masks)
    vc.PruneMasks.ones(vc.load(masks)).save(masks / "masks.safetensors")
    refused(["compact", masks, "--masks", masks / "masks.safetensors", "--out", masks, *overwrite],
            "would write over the input")
    assert snapshot(artifact) == before


def test_train_refuses_a_non_empty_out(tmp_path):
    out = tmp_path / "dense"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(["train", "vit-digits", "--data", "digits", "--epochs", "1", "--out", out], "pass --overwrite")
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_claim_ignores_the_lock_file_and_refuses_a_file(tmp_path):
    with output_folder.lock(tmp_path / "run"):
        assert output_folder.claim(tmp_path / "run") == tmp_path / "run"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        output_folder.claim(tmp_path / "file")


# ---------------------------------------------------------------- full disks

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]) if args else None)


def test_a_full_disk_while_saving_keeps_the_previous_artifact(artifact, tmp_path, monkeypatch):
    out = tmp_path / "a"
    vc.save(vc.load(artifact), out)
    before = snapshot(out)
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, metadata=None: enospc(path))
    with pytest.raises(ArtifactError, match=f"cannot write {out / 'model.safetensors'}: No space left on device"):
        vc.save(vc.create_model("vit-digits", depth=2), out)
    assert snapshot(out) == before  # weights and config both old; no temporary left


def test_a_full_disk_while_writing_json_or_masks_is_one_line(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_json(target, {"old": 1})
    monkeypatch.setattr(Path, "write_text", lambda self, text: enospc(self))
    with pytest.raises(ArtifactError, match=f"cannot write {target}: No space left on device"):
        write_json(target, {"new": 2})
    assert snapshot(tmp_path) == {"report.json": b'{\n  "old": 1\n}\n'}


@pytest.mark.real_export  # breaks the exporter's save
def test_cli_export_on_a_full_disk_is_one_line_and_keeps_the_old_file(artifact, tmp_path, monkeypatch):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"previous good file")
    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", lambda self, path, *a, **k: enospc(path))
    refused(["export", "onnx", artifact, onnx_path, "--no-verify", "--overwrite"],
            f"cannot write {onnx_path}: No space left on device")
    assert snapshot(tmp_path) == {"model.onnx": b"previous good file"}


@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KiB filesystem (tmpfs); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_one_line_and_keeps_the_previous_artifact(small_disk, artifact):
    out = small_disk / "compact"
    masks = vc.regroup(vc.load(artifact), vc.magnitude_prune(vc.load(artifact), 0.3), vc.RegroupConfig(head_ratio=0.9, mlp_ratio=0.95))
    vc.save(vc.compact(vc.load(artifact), masks), out)
    disk = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(bytes(disk.f_bavail * disk.f_frsize - 64 * 1024))  # 64 KiB left
    before = snapshot(out)
    refused(["compact", artifact, "--out", out, "--overwrite"], f"cannot write {out / 'model.safetensors'}: "
            "No space left on device")
    assert snapshot(out) == before


# ---------------------------------------------------------------- resume

def test_resume_with_changed_arguments_names_the_option_and_both_values(tmp_path):
    out = tmp_path / "run"
    fast = ["prune", "vit-digits", "--data", "digits", "--finetune-epochs", "0", "--batch-size", "128", "--json",
            "--out", out]
    assert runner.invoke(app, [str(a) for a in fast]).exit_code == 0
    before = snapshot(out)
    for option, value, expected in [
        ("--batch-size", "32", "--resume with a different --batch-size: the run used 128, now 32"),
        ("--seed", "5", "--resume with a different --seed: the run used 0, now 5"),
        ("--precision", "bf16", "--resume with a different --precision: the run used 'auto', now 'bf16'"),
        ("--head-ratio", "0.5", "--resume with a different --head-ratio: the run used 0.3, now 0.5"),
    ]:
        refused([*fast, "--resume", option, value], expected)
    assert snapshot(out) == before
    # Showing progress or not changes nothing: that resume goes through.
    assert runner.invoke(app, [str(a) for a in fast if a != "--json"] + ["--resume"]).exit_code == 0


def test_resume_from_other_data_is_refused(tmp_path):
    out = tmp_path / "run"
    fast = ["prune", "vit-digits", "--finetune-epochs", "0", "--batch-size", "128", "--json", "--out", out]
    assert runner.invoke(app, [str(a) for a in [*fast, "--data", "digits"]]).exit_code == 0
    folder = tmp_path / "images"
    for split in ("train", "test"):
        for label in range(10):
            (folder / split / str(label)).mkdir(parents=True)
            for i in range(2):
                torch.manual_seed(i + 10 * label)
                Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(folder / split / str(label) / f"{i}.png")
    refused([*fast, "--data", "imagefolder", "--data-root", folder, "--resume"],
            "--resume with a different --data: the run used 'digits', now 'imagefolder'")


# ---------------------------------------------------------------- killed mid-state

@pytest.mark.slow
def test_a_run_killed_mid_state_resumes_to_the_uninterrupted_result(tmp_path):
    """The run that is killed is a process of its own; the uninterrupted run and the resume, through
    the same CLI, run in this one (a process start-up costs seconds)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = runner.invoke(app, [*PRUNE, "--out", str(whole)])
    assert done.exit_code == 0, done.output
    run = subprocess.Popen([sys.executable, "-m", "vitcompact.cli", *PRUNE, "--out", str(killed)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    first_state = killed / "checkpoints" / "state_001" / "state.json"
    deadline = time.monotonic() + 600
    while not first_state.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.poll() is None, "the run ended before it could be killed mid-way"
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (killed / "model.safetensors").exists()  # killed before its end
    resumed = runner.invoke(app, [*PRUNE, "--out", str(killed), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    for name in ("model.safetensors", "masks.safetensors"):
        assert tensors_equal(whole / name, killed / name) == [], name


def test_a_kill_while_a_checkpoint_is_written_resumes_to_the_uninterrupted_result(bundle, tmp_path):
    """What a SIGKILL during checkpoint writing leaves: a state folder without its `state.json`
    (written last) and a half-written temporary of a dead writer. Resume redoes that state."""
    def config(out, resume=False):
        return RSSTConfig(head_ratio=0.5, mlp_ratio=0.5, states=2, epochs_per_state=1, finetune_epochs=1,
                          train=TrainConfig(progress=False)), RunFolder(out, resume=resume)

    whole = prune(tiny(), bundle, *config(tmp_path / "whole"))
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "whole", killed)
    state = killed / "checkpoints" / "state_002"
    (state / "state.json").unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (state / f".masks.safetensors.tmp-{dead.pid}-a1b2c3.tmp").write_bytes(b"half a file")
    for name in ("masks.safetensors", "structure.json", "result.json", "model.safetensors", "config.json"):
        (killed / name).unlink(missing_ok=True)
    model = tiny()
    resumed = prune(model, bundle, *config(killed, resume=True))
    assert resumed.masks == whole.masks
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(), model.state_dict().values()))
    assert sorted(p.name for p in state.iterdir() if p.name.startswith(".")) == []  # the dead writer's temporary went


# ---------------------------------------------------------------- files written together (issue 29)

EXPORT = ["export", "onnx", "--no-verify", "--optimize", "off", "--json"]


def test_export_refuses_to_replace_an_existing_file_unless_overwrite(artifact, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"someone else's file")
    refused([*EXPORT, artifact, out], f"{out} already exists; pass --overwrite to replace it, or choose another file name")
    assert snapshot(tmp_path) == {"model.onnx": b"someone else's file"}
    result = runner.invoke(app, [*EXPORT, str(artifact), str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert vc.export.read_metadata(out)["precision"] == "fp32" and sorted(snapshot(tmp_path)) == ["model.onnx"]


def test_export_variants_are_refused_before_work_where_a_folder_stands_in_the_way(artifact, tmp_path):
    out = tmp_path / "model.onnx"
    (tmp_path / "model.int8.onnx").mkdir()
    refused([*EXPORT, artifact, out, "--int8", "dynamic"],
            f"{tmp_path / 'model.int8.onnx'} is a folder; give the path of the .onnx file to write")
    assert snapshot(tmp_path) == {} and [p.name for p in tmp_path.iterdir()] == ["model.int8.onnx"]


def test_export_publishes_the_file_and_its_variants_together_or_not_at_all(artifact, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous fp32")
    (tmp_path / "model.fp16.onnx").write_bytes(b"previous fp16")
    import vitcompact.export.files as export_files
    real = os.replace

    def refuse_int8(src, dst):
        if str(dst).endswith("model.int8.onnx"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        real(src, dst)
    monkeypatch.setattr(export_files.os, "replace", refuse_int8)
    refused([*EXPORT, artifact, out, "--fp16", "--int8", "dynamic", "--overwrite"],
            f"cannot write {tmp_path / 'model.int8.onnx'}: Permission denied")
    monkeypatch.setattr(export_files.os, "replace", real)
    # What was there is back, nothing new is published, and no staging folder or lock is left.
    assert snapshot(tmp_path) == {"model.onnx": b"previous fp32", "model.fp16.onnx": b"previous fp16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fp16.onnx", "model.onnx"]
    result = runner.invoke(app, [*EXPORT, str(artifact), str(out), "--fp16", "--int8", "dynamic", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(snapshot(tmp_path)) == ["model.fp16.onnx", "model.int8.onnx", "model.onnx"]


def test_a_second_export_to_the_same_file_is_refused_naming_the_writer(artifact, tmp_path):
    out = tmp_path / "model.onnx"
    with file_held(out) as holder:
        refused([*EXPORT, artifact, out], f"{out} is being written by another vitcompact process (PID {holder.pid})")
        assert not out.exists()
    result = runner.invoke(app, [*EXPORT, str(artifact), str(out)])  # the lock went with its process
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_sigterm_during_pipeline_removes_its_partial_folder(tmp_path):
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "vitcompact.cli", "pipeline", "--out", str(out), "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    try:
        assert _wait_for(lambda: any(tmp_path.glob(".run.partial-*")), 120), run.stderr.read() if run.poll() else ""
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_dead_writers_partial_folder_is_swept_by_the_next_run_in_that_folder(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getpid()
    left = tmp_path / f".other.partial-{dead}-k1ll3d"
    (left / "dense").mkdir(parents=True)
    (left / "dense" / "model.safetensors").write_bytes(b"\0" * 1024)
    running = tmp_path / f".another.partial-{alive}-w0rk1ng"
    running.mkdir()
    refused(["pipeline", "--model", "no-such-model", "--out", tmp_path / "new"], "no-such-model")
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name]
