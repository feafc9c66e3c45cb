"""The first hour of a new user (issue 23): ``--version``, ``train --help`` with the chosen
preset's values, the ETA, progress when a stretch runs long, and a clone named ``proteus`` next
to a script (a clear one-line ImportError naming it, not a confusing failure later)."""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import proteus
from proteus import train as T
from proteus.cli import DEFAULT_PRESET, build_parser, main
from proteus.config import PRESETS, build_config
from proteus.train import Quiet, eta_s

ROOT = Path(__file__).resolve().parent.parent


def test_version_names_the_package_its_place_and_torch(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    assert out.startswith(f"proteus {proteus.__version__} ({Path(proteus.__file__).parent})")
    assert "torch " in out and "triton " in out
    # one version: setup.py's is the package's
    setup = (ROOT / "setup.py").read_text()
    assert re.search(r'version="([^"]+)"', setup).group(1) == proteus.__version__


def _help_values(argv: list[str], capsys, monkeypatch) -> dict[str, str]:
    """``{dest: text after '[preset: '}`` of every config option in ``train --help``."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: nothing wrapped mid-value
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_train_help_shows_the_chosen_presets_values(preset, capsys, monkeypatch):
    argv = ["train", *(["--preset", preset] if preset else []), "--help"]
    text = _help_values(argv, capsys, monkeypatch)
    name = preset or DEFAULT_PRESET
    cfg = build_config(name, environ={})
    actions = [a for a in build_parser(name)._subparsers._group_actions[0].choices["train"]
               ._actions if "." in (a.dest or "") and "env PROTEUS_" in (a.help or "")]
    assert len(actions) > 50
    for a in actions:
        section, field = a.dest.split(".", 1)
        want = f"[{name}: {getattr(getattr(cfg, section), field)!r}"
        start = text.index(f"\n  {a.option_strings[0]} ")
        entry = " ".join(text[start:text.find("\n  -", start + 1)].split())
        assert want in entry, (a.dest, entry)
    assert f"the value of the {name} preset" in " ".join(text.split())


def test_train_help_differs_between_presets_where_they_differ(capsys, monkeypatch):
    tiny = _help_values(["train", "--help"], capsys, monkeypatch)
    h100 = _help_values(["train", "--preset=h100", "--help"], capsys, monkeypatch)
    assert "[cpu-tiny: 4;" in tiny and "[h100: 11;" in h100  # --num-layers
    assert "[default" not in tiny


def test_eta_respects_both_the_iterations_and_the_wallclock_cap():
    # the bug of issue 23: "eta 0m34s at step 6/6" (the cap's time left, not the steps')
    assert eta_s(6, 6, 100.0, 26.0, 60.0) == 0.0
    assert eta_s(2, 6, 1000.0, 2.0, 60.0) == pytest.approx(4.0)   # the steps end first
    assert eta_s(2, 1000, 1000.0, 50.0, 60.0) == pytest.approx(10.0)  # the cap ends first
    assert eta_s(2, 6, 1000.0, 2.0, 0.0) == pytest.approx(4.0)   # no cap
    assert eta_s(10, 1000, 1000.0, 70.0, 60.0) == 0.0  # past the cap: never negative


class _Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


class _Lines(logging.Handler):
    """The messages ``proteus.train`` logs, whatever the ``proteus`` logger's set-up (the
    command line's makes it stop propagating to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger("proteus.train")

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


def test_quiet_says_what_runs_when_nothing_was_printed():
    clock = _Clock()
    q = Quiet(every_s=10.0, clock=clock)
    assert q.poll() is None  # nothing named yet
    q.doing("warm-up step 1/3 (compiling)")
    clock.t += 9.0
    assert q.poll() is None  # not yet 10 s of silence
    clock.t += 2.0
    with _Lines() as logged:
        line = q.poll()
    assert line == "  ... warm-up step 1/3 (compiling): 0m11s so far"
    assert logged.lines == [line]
    clock.t += 5.0
    assert q.poll() is None  # the line just printed counts
    q.said()
    clock.t += 9.0
    assert q.poll() is None
    clock.t += 61.0
    assert q.poll() == "  ... warm-up step 1/3 (compiling): 1m26s so far"
    # many short steps after a line: the step lines speak for them, not this one
    clock.t += 30.0
    q.doing("step 7")
    clock.t += 3.0
    assert q.poll() is None
    clock.t += 7.0
    assert q.poll() == "  ... step 7: 0m10s so far"


def _script_beside(folder: Path, link_to: Path) -> subprocess.CompletedProcess:
    (folder / "proteus").symlink_to(link_to, target_is_directory=True)
    (folder / "script.py").write_text("import proteus.kernels\nprint('imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "script.py"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_clone_named_proteus_beside_a_script_is_a_clear_import_error(tmp_path):
    # the README's install is editable: a folder `proteus` without __init__.py (the clone's
    # root) next to the script becomes a namespace package ahead of the installed one
    r = _script_beside(tmp_path, ROOT)
    assert r.returncode != 0 and "imported" not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: proteus: the folder ") and "shadows" in last
    assert str(tmp_path / "proteus") in last


def test_a_package_folder_from_another_tree_is_a_clear_import_error(tmp_path):
    # a `proteus` package folder (not this install's) beside the script, with kernels coming
    # from the installed tree: the two would mix
    other = tmp_path / "other"
    other.mkdir()
    for f in (ROOT / "proteus").glob("*.py"):
        (other / f.name).write_bytes(f.read_bytes())
    here = tmp_path / "here"
    here.mkdir()
    r = _script_beside(here, other)
    assert r.returncode != 0 and "imported" not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: proteus: the package came from ") and "shadows" in last
    assert str(other) in last


def _setup_kwargs() -> dict:
    """The literal keyword arguments of setup.py's ``setup(...)`` call."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords
            if k.arg in ("install_requires", "extras_require", "entry_points")}


def test_plot_works_after_the_first_install_command():
    # the README's first command is `pip install -e .` (no extras): `proteus plot` needs
    # matplotlib, so it is a regular requirement, not only one of the [test]/[plot] extras
    kw = _setup_kwargs()
    assert any(r.startswith("matplotlib") for r in kw["install_requires"])
    assert "proteus=proteus.cli:main" in kw["entry_points"]["console_scripts"]


def test_training_prints_a_line_every_few_seconds_not_only_every_n_steps(monkeypatch):
    # log_every 100 over 3 steps prints step 1 and the last; with the time-based interval at 0
    # every step is printed, each with an ETA of the steps left (no wall-clock cap here)
    monkeypatch.setattr(T, "PROGRESS_EVERY_S", 0.0)
    cfg = build_config("smoke", {"train.iterations": 3, "train.log_every": 100,
                                 "train.max_wallclock_s": 0.0, "train.warmup_steps": 0,
                                 "train.seq_len": 32, "train.batch_tokens": 64}, environ={})
    with _Lines() as logged:
        T.train(cfg)
    steps = [m for m in logged.lines if m.startswith("step ")]
    assert [int(m.split()[1]) for m in steps] == [1, 2, 3], steps
    assert steps[-1].endswith("eta 0m00s")
