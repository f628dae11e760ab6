"""Security (issue 8): no code runs from a checkpoint or a config file, and jobs write only where told.

- every ``torch.load`` in adre_ray/ passes ``weights_only=True``, and adre_ray/ and jobs/ never call
  eval / exec / pickle-style loaders / unsafe YAML loaders (an AST scan: aliases and ``from`` imports are
  resolved, comments and strings cannot hide or fake a call);
- a checkpoint carrying a pickled object whose unpickling runs code is refused with ``ValueError`` and the
  code never runs (the same file does run it under ``weights_only=False``: the payload is live);
- YAML with a ``!!python/...`` tag is refused by ``load_config`` (file or ``--set``), again without running;
- a certification and an analysis started in an empty working directory leave it empty and change
  nothing outside the output folders and the MLflow store they were given.
"""

from __future__ import annotations

import ast
import hashlib
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from adre_ray import cli
from adre_ray.config import load_config
from adre_ray.config.certify import CertifyConfig
from adre_ray.config.train import TrainConfig
from adre_ray.distributed import certify as certify_mod
from adre_ray.models import build_model, load_model_checkpoint, save_model_checkpoint
from adre_ray.models.checkpoint import FORMAT

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("adre_ray", "jobs")

# -- the AST scan --------------------------------------------------------------------------------------

TORCH_LOADS = {"torch.load", "torch.serialization.load"}
FORBIDDEN_CALLS = {
    "eval", "exec", "builtins.eval", "builtins.exec",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
    "cPickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads", "marshal.load",
    "marshal.loads", "shelve.open", "pandas.read_pickle", "yaml.unsafe_load", "yaml.unsafe_load_all",
    "yaml.full_load", "yaml.full_load_all",
}
YAML_LOADS = {"yaml.load", "yaml.load_all"}  # allowed only with Loader=yaml.SafeLoader / yaml.CSafeLoader
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.loader.SafeLoader",
                     "yaml.cyaml.CSafeLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin for every ``import`` / ``from ... import`` in the module (any depth)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``th.serialization.load`` -> ``torch.serialization.load`` given ``import torch as th``."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan_source(source: str, filename: str = "<source>") -> tuple[list[str], int]:
    """(violations as ``file:line: what``, number of torch.load calls seen) for one module's source."""
    tree = ast.parse(source, filename=filename)
    aliases = _aliases(tree)
    problems: list[str] = []
    torch_loads = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _qualified(node.func, aliases)
        keywords = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        where = f"{filename}:{node.lineno}"
        if name in TORCH_LOADS:
            torch_loads += 1
            if not _is_true(keywords.get("weights_only")):
                problems.append(f"{where}: {name} without weights_only=True")
        elif name in FORBIDDEN_CALLS:
            problems.append(f"{where}: {name}")
        elif name in YAML_LOADS:
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or _qualified(loader, aliases) not in SAFE_YAML_LOADERS:
                problems.append(f"{where}: {name} without a safe Loader")
        elif name in ("numpy.load",) and _is_true(keywords.get("allow_pickle")):
            problems.append(f"{where}: {name}(allow_pickle=True)")
    return problems, torch_loads


def test_scanner_finds_every_kind_of_unsafe_call():
    """The scan itself can fail: each line below is one violation, however it is spelled."""
    unsafe = """
import torch, torch as th, yaml, pickle as pk, numpy as np, builtins
from torch import load
from torch.serialization import load as sload
from yaml import unsafe_load
from pickle import loads
torch.load("a")
th.load("a", weights_only=False)
load("a", map_location="cpu")
sload("a", weights_only=None)
eval("1 + 1")
exec("x = 1")
builtins.eval("2")
pk.load(open("f", "rb"))
loads(b"")
yaml.load("a: 1")
yaml.load("a: 1", Loader=yaml.Loader)
yaml.load_all("a: 1", yaml.UnsafeLoader)
yaml.full_load("a: 1")
unsafe_load("a: 1")
np.load("x.npy", allow_pickle=True)
"""
    problems, torch_loads = scan_source(unsafe)
    flagged_lines = sorted(int(problem.split(":")[1]) for problem in problems)
    assert flagged_lines == list(range(7, 22)) and torch_loads == 4, problems  # lines 7-21, once each
    safe = """
import torch, yaml, numpy as np
from yaml import SafeLoader
torch.load("a", map_location="cpu", weights_only=True)
yaml.safe_load("a: 1")
yaml.load("a: 1", Loader=SafeLoader)
yaml.load("a: 1", Loader=yaml.CSafeLoader)
np.load("x.npy")
text = "eval('1') and pickle.loads(b'')"  # strings are not calls
model.eval()  # a method named eval is not the builtin
"""
    assert scan_source(safe) == ([], 1)


def test_no_unsafe_deserialization_or_eval_in_the_package_and_jobs():
    problems: list[str] = []
    torch_loads = 0
    files = [path for folder in SCANNED for path in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 30  # the scan did look at the code base
    for path in files:
        found, loads = scan_source(path.read_text(), str(path.relative_to(REPO)))
        problems += found
        torch_loads += loads
    assert problems == []
    assert torch_loads >= 2  # checkpoint.read_checkpoint and the training resume (train_state.pt)


# -- checkpoints: pickled objects never run ------------------------------------------------------------


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``exec`` on a statement that writes ``target`` (an attacker's payload)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('code ran')",))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, "cifar10")
    return save_model_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model, model_name="small_cnn",
                                 num_classes=10, dataset="cifar10", extra={"sigma": 0.25})


@pytest.mark.parametrize("where", ["top_level", "state_dict", "extra"])
def test_checkpoint_with_a_pickled_object_is_refused_without_running_it(where, good_checkpoint, tmp_path):
    target = tmp_path / "pwned.txt"
    record = torch.load(good_checkpoint, weights_only=True)
    payload = _RunsCodeWhenUnpickled(target)
    if where == "top_level":
        record["payload"] = payload
    elif where == "state_dict":
        record["state_dict"]["1.0.weight"] = payload
    else:
        record["extra"] = {"note": payload}
    path = tmp_path / "evil.pt"
    torch.save(record, path)  # torch's own zip format, as a real tampered checkpoint would be

    with pytest.raises(ValueError, match=r"evil\.pt'.*weights_only=True"):
        load_model_checkpoint(path)
    assert not target.exists()
    # the control: the same bytes DO run code when unpickled without weights_only
    torch.load(path, weights_only=False)
    assert target.read_text() == "code ran"


def test_legacy_pickle_checkpoint_and_train_state_are_refused(good_checkpoint, tmp_path):
    """A plain pickle file (no torch zip) and a tampered ``train_state.pt`` in a resume folder."""
    from adre_ray.distributed.train import TRAIN_STATE_FILENAME, _load_train_checkpoint

    target = tmp_path / "pwned.txt"
    with open(tmp_path / "legacy.pt", "wb") as handle:
        pickle.dump({"format": FORMAT, "x": _RunsCodeWhenUnpickled(target)}, handle, protocol=2)
    with pytest.raises(ValueError, match=r"legacy\.pt'.*weights_only=True"):
        load_model_checkpoint(tmp_path / "legacy.pt")

    folder = tmp_path / "checkpoint_epoch_000000"
    folder.mkdir()
    (folder / "model.pt").write_bytes(good_checkpoint.read_bytes())
    torch.save({"epoch": 0, "optimizer": _RunsCodeWhenUnpickled(target)}, folder / TRAIN_STATE_FILENAME)
    cfg = load_config(TrainConfig, None, ["model=small_cnn"])
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _load_train_checkpoint(folder, build_model("small_cnn", 10, "cifar10"), cfg)
    assert not target.exists()


def test_certify_cli_refuses_a_code_carrying_checkpoint(good_checkpoint, tmp_path, monkeypatch, capsys):
    import ray

    target = tmp_path / "pwned.txt"
    record = torch.load(good_checkpoint, weights_only=True)
    record["extra"]["sigma"] = _RunsCodeWhenUnpickled(target)
    torch.save(record, tmp_path / "evil.pt")
    if not ray.is_initialized():  # the refusal comes before any Ray work
        monkeypatch.setattr(certify_mod, "connect_ray", lambda *a, **k: False)
    code = cli.main(["certify", "--set", f"checkpoint={tmp_path / 'evil.pt'}", "--set", "tracking_uri=none",
                     "--set", f"output_dir={tmp_path / 'out'}", "--set", "data_dir=/nonexistent"])
    assert code == 2 and "weights_only=True" in capsys.readouterr().err
    assert not target.exists() and not (tmp_path / "out").exists()


# -- YAML: python tags never run -----------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["!!python/object/apply:builtins.exec", "!!python/object/new:builtins.exec"])
def test_yaml_python_tags_are_refused_without_running(tag, tmp_path):
    target = tmp_path / "pwned.txt"
    statement = f"open({str(target)!r}, 'w').write('code ran')"
    text = f'model: {tag} ["{statement}"]\n'
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^config='{path}': not valid YAML"):
        load_config(TrainConfig, path)
    with pytest.raises(ValueError, match=r"^override 'model=!!python.*not valid YAML"):
        load_config(TrainConfig, None, [f'model={tag} ["{statement}"]'])
    with pytest.raises(ValueError, match=rf"^config='{path}'"):
        load_config(CertifyConfig, path)
    assert not target.exists()
    yaml.unsafe_load(text)  # the control: an unsafe loader runs it
    assert target.read_text() == "code ran"


def test_yaml_python_name_tag_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/name:os.system\n")
    with pytest.raises(ValueError, match=rf"^config='{path}': not valid YAML"):
        load_config(TrainConfig, path)
    with pytest.raises(ValueError, match=r"^override 'model=!!python/name:os.system'.*not valid YAML"):
        load_config(TrainConfig, None, ["model=!!python/name:os.system"])


# -- jobs write only under the folders they are given --------------------------------------------------


def _tree(root: Path) -> dict[str, str]:
    """path -> sha256 (files) or "dir", everything under ``root``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _stat_tree(root: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns): for the large shared data folder, where hashing would be slow."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_certify_and_analyze_write_only_to_their_output_and_mlflow_store(
        ray_cluster, cifar10_dir, mlflow_uri, good_checkpoint, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    checkpoint = inputs / "model.pt"
    checkpoint.write_bytes(good_checkpoint.read_bytes())
    out, analysis = tmp_path / "out", tmp_path / "analysis"
    allowed = (str(out), str(analysis), str(tmp_path / "mlflow.db"), str(tmp_path / "mlartifacts"))
    assert mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    before, data_before = _tree(tmp_path), _stat_tree(cifar10_dir)
    repo_before = {p.name for p in REPO.iterdir()}

    assert cli.main(["certify", "--set", f"checkpoint={checkpoint}", "--set", f"data_dir={cifar10_dir}",
                     "--set", f"output_dir={out}", "--set", "n0=32", "--set", "n=64", "--set", "max_images=2",
                     "--set", "skip=500", "--set", "shard_size=64", "--set", "batch_size=64",
                     "--set", "num_actors=1", "--set", "progress=false"]) == 0
    assert cli.main(["analyze", str(out), "--output-dir", str(analysis)]) == 0
    capsys.readouterr()

    after = _tree(tmp_path)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed and all(p.startswith(allowed) for p in changed), sorted(changed)
    assert any(p.startswith(str(out) + "/part-") for p in changed)  # the run did write its results
    assert any(p.startswith(str(tmp_path / "mlflow.db")) for p in changed)  # and tracked to the given store
    assert list(cwd.iterdir()) == []
    assert _stat_tree(cifar10_dir) == data_before
    new_in_repo = {p.name for p in REPO.iterdir()} - repo_before
    assert not new_in_repo & {"mlflow.db", "mlruns", "mlartifacts", "results", "runs", "demo_output"}
