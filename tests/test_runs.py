"""``lens_attn.runs``: atomic files, strict JSON and the run-folder contract, under hostile conditions.

The numbered cases are those of the issue "Run folders that never lose, mix or leak data": 1 planted
symlinks, 2 concurrent writers, 3 runs mixing in one folder (and a SIGKILLed run), 4 ``--out``
checked before the compute, 7 strict JSON. Every subprocess here is bounded by a timeout.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lens_attn.errors import InputError, LensAttnError
from lens_attn.files import dumps_strict, open_atomic, save_table_and_json, write_text_atomic
from lens_attn.runs import LOCK_FILE, RUN_JSON, RunFolder, check_out_dir
from lens_attn.scoring.results import HeadScores

REPO = Path(__file__).resolve().parents[1]


class _Table:
    """The one method ``save_table_and_json`` needs of a dataframe."""

    def __init__(self, text: str):
        self.text = text

    def to_csv(self, index: bool = False) -> str:
        return self.text


def _strict_loads(text: str):
    """A JSON parser that refuses NaN / Infinity, as strict parsers (JavaScript's) do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------ 1. planted symlinks


@pytest.mark.parametrize(
    "planted",
    ["scores.csv.tmp", "scores.json.tmp", f".scores.csv.tmp{os.getpid()}", ".scores.csv.tmp"],
)
def test_1_a_symlink_at_a_would_be_temp_name_does_not_redirect_the_write(tmp_path, planted):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / planted).symlink_to(victim)
    save_table_and_json(run, "scores", _Table("layer,head\n0,0\n"), {"values": {}})
    assert victim.read_text() == "precious"
    assert not (run / "scores.csv").is_symlink() and (run / "scores.csv").read_text().startswith(
        "layer"
    )
    assert (run / planted).is_symlink()  # left alone, not written through


def test_1_a_symlink_at_the_final_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "scores.csv").symlink_to(victim)
    write_text_atomic(tmp_path / "scores.csv", "new")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "scores.csv").is_symlink()
    assert (tmp_path / "scores.csv").read_text() == "new"


def test_1_temp_file_is_removed_when_the_write_fails_and_the_old_file_survives(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), open_atomic(target, text=True) as fh:
        fh.write("half a new file")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert target.read_text() == "old"


def test_1_atomic_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = write_text_atomic(tmp_path / "a.txt", "x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


# --------------------------------------------------------------------- 2. concurrent writers

WRITER = """
    import sys
    from lens_attn.files import save_table_and_json

    class Table:
        def __init__(self, text): self.text = text
        def to_csv(self, index=False): return self.text

    out, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(n):
        big = [[float(i)] * 64 for _ in range(64)]  # ~20 kB: a torn read would show
        save_table_and_json(out, "scores", Table(f"who,i\\n{who},{i}\\n"), {"who": who, "big": big})
"""


def test_2_two_writer_processes_and_a_reader_never_see_a_torn_or_missing_file(tmp_path):
    save_table_and_json(tmp_path, "scores", _Table("who,i\n"), {"who": "seed", "big": []})
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path), who, "200"],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("a", "b")
    ]
    reads, deadline = 0, time.monotonic() + 60
    try:
        while any(w.poll() is None for w in writers):
            assert time.monotonic() < deadline, "writers did not finish in 60 s"
            payload = json.loads((tmp_path / "scores.json").read_text())  # never torn, never absent
            assert payload["who"] in ("seed", "a", "b")
            reads += 1
    finally:
        for w in writers:
            w.wait(timeout=60)
    assert [w.returncode for w in writers] == [0, 0], [w.stderr.read() for w in writers]
    assert reads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv", "scores.json"]  # no temps


# -------------------------------------------------------------- 3. a folder never mixes two runs


def _complete_run(out: Path, *, figures: bool = True) -> None:
    with RunFolder(out) as run:
        run.write_text("scores.csv", "old scores")
        run.write_text("ablation.csv", "old ablation")
        if figures:
            run.write_bytes("figures/scores_induction.png", b"old png")
        run.complete({"run": "old"})


def test_3_run_json_is_written_last_and_lists_the_files(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out) as run:
        run.write_text("scores.csv", "s")
        assert not (out / RUN_JSON).exists()
        # the lock holds the pid, then a journal of the files written so far
        assert (out / LOCK_FILE).read_text().splitlines() == [str(os.getpid()), "scores.csv"]
        run.complete({"k": float("nan")})
    info = _strict_loads((out / RUN_JSON).read_text())
    assert info["files"] == ["scores.csv", "run.json"] and info["k"] is None
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("previous", ["complete", "incomplete"])
def test_3_a_previous_run_is_refused_without_overwrite(tmp_path, previous):
    out = tmp_path / "run"
    _complete_run(out)
    if previous == "incomplete":
        (out / RUN_JSON).unlink()
    with pytest.raises(InputError, match="holds a previous run.*--overwrite"):
        with RunFolder(out):
            pass
    assert (out / "scores.csv").read_text() == "old scores"  # untouched
    assert not (out / LOCK_FILE).exists()  # the refusal released the lock


def test_3_overwrite_removes_the_previous_outputs_first_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    _complete_run(out)
    (out / "notes.txt").write_text("mine")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    info = json.loads((out / RUN_JSON).read_text())
    (out / "elsewhere").symlink_to(tmp_path)
    # a hostile run.json: paths outside the folder, or through a symlink, are never followed
    info["files"] += ["../victim.txt", str(victim), "elsewhere/victim.txt"]
    (out / RUN_JSON).write_text(json.dumps(info))
    with RunFolder(out, overwrite=True) as run:
        # like --no-figures: the first run's figures/ must not survive into the second run
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "elsewhere", "notes.txt"]
        run.write_text("scores.csv", "new scores")
        run.complete({"run": "new"})
    assert sorted(p.name for p in out.iterdir()) == [
        "elsewhere",
        "notes.txt",
        RUN_JSON,
        "scores.csv",
    ]
    assert victim.read_text() == "precious"


def test_3_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out) as first:
        with pytest.raises(
            InputError, match=f"in use by another lens-attn run \\(pid {os.getpid()}"
        ):
            with RunFolder(out, overwrite=True):
                pass
        first.write_text("scores.csv", "first")  # the refused run did not disturb the first
        first.complete({})
    assert json.loads((out / RUN_JSON).read_text())["files"] == ["scores.csv", RUN_JSON]


def test_3_an_exception_leaves_the_run_incomplete_and_the_folder_unlocked(tmp_path):
    out = tmp_path / "run"
    _complete_run(out)
    with pytest.raises(RuntimeError), RunFolder(out, overwrite=True) as run:
        run.write_text("scores.csv", "new")
        raise RuntimeError("compute failed")
    assert not (out / RUN_JSON).exists() and not (out / LOCK_FILE).exists()
    assert (out / "scores.csv").read_text() == "new" and not (out / "ablation.csv").exists()


KILLED_RUN = """
    import sys, time
    from lens_attn.runs import RunFolder

    out, n_files = sys.argv[1], int(sys.argv[2])
    with RunFolder(out, overwrite=True) as run:
        for i in range(n_files):
            run.write_text("scores.csv" if i == 0 else f"new_{i}.csv", "new")
        print("ready", flush=True)
        while True:  # keeps writing until it is killed
            run.write_text("ablation.csv", "new ablation " * 1000)
"""


@pytest.mark.parametrize("n_files", [0, 1, 3], ids=["killed-at-start", "after-1", "after-3"])
def test_3_a_run_killed_during_its_writes_never_leaves_old_run_json_beside_new_files(
    tmp_path, n_files
):
    out = tmp_path / "run"
    _complete_run(out)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(out), str(n_files)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    names = {p.name for p in out.iterdir()}
    # the old run's run.json went first; the new run never wrote one: incomplete, not mixed
    assert RUN_JSON not in names
    assert "figures" not in names  # the old run's outputs went before the new run wrote
    if n_files:
        assert (out / "scores.csv").read_text() == "new"
    assert LOCK_FILE in names  # stale: its process is dead

    with RunFolder(out, overwrite=True) as run:  # the stale lock is taken over
        # the killed run's own files (new_<i>.csv, stray temp files) are gone too
        assert sorted(os.listdir(out)) == [LOCK_FILE]
        run.write_text("scores.csv", "third")
        run.complete({})
    assert sorted(os.listdir(out)) == [RUN_JSON, "scores.csv"]


def test_3_two_runs_started_at_once_one_wins_one_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = """
        import sys, time
        from lens_attn.errors import InputError
        from lens_attn.runs import RunFolder
        try:
            with RunFolder(sys.argv[1]) as run:
                print("locked", flush=True)
                time.sleep(1.0)
                run.write_text("scores.csv", sys.argv[2])
                run.complete({"who": sys.argv[2]})
        except InputError as err:
            print("refused:", err, flush=True)
    """
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(out), who],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for who in ("a", "b")
    ]
    outputs = [r.communicate(timeout=60)[0] for r in runs]
    assert sorted(o.split()[0] for o in outputs) == ["locked", "refused:"], outputs
    winner = json.loads((out / RUN_JSON).read_text())["who"]
    assert (out / "scores.csv").read_text() == winner


# ---------------------------------------------------------------- 4. --out checked up front


@pytest.mark.parametrize("case", ["file", "under-a-file", "not-writable"])
def test_4_unusable_out_folders_are_refused_with_a_clear_message(tmp_path, case):
    if case == "file":
        out = tmp_path / "out"
        out.write_text("")
        message = "is a file, not a folder"
    elif case == "under-a-file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"
        message = "cannot be created: .* is a file"
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write anywhere")
        out = tmp_path / "locked" / "run"
        out.parent.mkdir()
        out.parent.chmod(0o500)
        message = "not writable"
    with pytest.raises(InputError, match=message):
        check_out_dir(out)
    with pytest.raises(InputError, match=message):
        RunFolder(out)


@pytest.mark.parametrize("command", ["discover", "scores", "ablate", "patterns"])
@pytest.mark.parametrize("case", ["file", "previous-run"])
def test_4_the_cli_checks_out_before_loading_the_model(
    tmp_path, monkeypatch, capsys, command, case
):
    from lens_attn import cli, loading

    def never(*args, **kwargs):
        raise AssertionError("load_model was called before --out was checked")

    monkeypatch.setattr(loading, "load_model", never)
    out = tmp_path / "out"
    if case == "file":
        out.write_text("")
    else:
        if command == "patterns":
            pytest.skip("patterns writes plain files, not a run folder")
        _complete_run(out)
    argv = [command, "x"] if command == "patterns" else [command]
    start = time.perf_counter()
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert time.perf_counter() - start < 20  # imports only; load_model itself would raise
    err = capsys.readouterr().err
    assert err.startswith("lens-attn: error: --out") and err.count("\n") == 1
    if case == "previous-run":
        assert "--overwrite" in err and (out / RUN_JSON).exists()


# ------------------------------------------------------------------------------ 7. strict JSON


def test_7_scores_json_is_strict_with_nan_as_null_and_loads_back_as_nan(tmp_path):
    grid = torch.tensor([[0.5, float("nan")], [float("inf"), 0.0]])
    HeadScores({"induction": grid}, {"induction": torch.full_like(grid, float("nan"))}).save(
        tmp_path
    )
    payload = _strict_loads((tmp_path / "scores.json").read_text())
    assert payload["values"]["induction"] == [[0.5, None], [None, 0.0]]
    loaded = HeadScores.load(tmp_path)
    assert torch.isnan(loaded["induction"][0, 1]) and torch.isnan(loaded.stderr["induction"]).all()
    assert dumps_strict({"a": [float("-inf")]}) == '{"a": [null]}'


def test_7_loading_someone_elses_json_names_the_file(tmp_path):
    (tmp_path / "scores.json").write_text('{"results": [1, 2, 3]}')
    with pytest.raises(LensAttnError, match="scores.json was not written by HeadScores.save"):
        HeadScores.load(tmp_path)
    (tmp_path / "scores.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(LensAttnError, match="scores.json is not a JSON file"):
        HeadScores.load(tmp_path)


# ------------------------------------------------------- 3. the CLI's run folders, end to end


def test_3_a_second_run_needs_overwrite_and_then_leaves_nothing_of_the_first(
    tmp_path, tiny_checkpoints, capsys
):
    from lens_attn.cli import main

    out = tmp_path / "run"
    _complete_run(out)  # a previous run with figures/ and ablation.csv, as discover leaves
    model = ["--model", str(tiny_checkpoints["gqa"].path), "--device", "cpu"]
    argv = ["scores", *model, "--scores", "induction", "--out", str(out)]
    assert main(argv) == 2
    assert "holds a previous run" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    # no old figures/, no old ablation.csv: only this run's files, all listed in run.json
    names = sorted(p.name for p in out.iterdir())
    assert names == ["labels.csv", RUN_JSON, "scores.csv", "scores.json"]
    assert sorted(json.loads((out / RUN_JSON).read_text())["files"]) == names
    _strict_loads((out / "scores.json").read_text())


def test_3_scores_and_ablate_runs_record_their_files(tmp_path, tiny_checkpoints):
    from lens_attn.cli import main

    model = ["--model", str(tiny_checkpoints["gqa"].path), "--device", "cpu"]
    assert main(["scores", *model, "--scores", "induction", "--out", str(tmp_path / "s")]) == 0
    files = json.loads((tmp_path / "s" / RUN_JSON).read_text())["files"]
    assert files == ["scores.csv", "scores.json", "labels.csv", RUN_JSON]
    assert main(["ablate", *model, "--heads", "L1H3", "--out", str(tmp_path / "a")]) == 0
    files = json.loads((tmp_path / "a" / RUN_JSON).read_text())["files"]
    assert files == ["ablation.csv", "ablation/ablation.csv", "ablation/ablation.json", RUN_JSON]
