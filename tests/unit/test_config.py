"""Tests for ckpt_track.config: sources, precedence, coercion and every error path."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from ckpt_track.config import (
    NON_SETTING_ENV,
    Retention,
    Settings,
    find_config_file,
    load_settings,
)
from ckpt_track.errors import ConfigError, UnknownBackend

SECTIONS = {
    "local": frozenset({"root"}),
    "mlflow": frozenset({"tracking_uri", "experiment"}),
    "wandb": frozenset({"entity", "offline"}),
}


def load(
    tmp_path: Path,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """load_settings isolated from the real environment, cwd and registry."""
    return load_settings(
        overrides, cwd=cwd or tmp_path, env=env or {}, backend_sections=SECTIONS
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def pyproject(path: Path, body: str) -> Path:
    return write(path / "pyproject.toml", "[project]\nname = 'x'\n\n[tool.ckpt_track]\n" + body)


# --------------------------------------------------------------------------- defaults


def test_defaults_without_any_source(tmp_path: Path) -> None:
    s = load(tmp_path)
    assert s == Settings()
    assert s.backend == ("local",)
    assert s.project == "default"
    assert s.monitor == "val/loss"
    assert s.mode == "min"
    assert s.shard_size == 2 * 1024**3
    assert s.blocking is False
    assert s.max_in_flight == 1
    assert s.retention == Retention()
    assert not s.retention.enabled()
    assert dict(s.backends) == {}
    assert dict(s.sources) == {}


def test_settings_is_frozen_and_hashable() -> None:
    s = Settings(backends={"local": {"root": "/x"}})
    with pytest.raises(AttributeError):
        s.project = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.backends["local"]["root"] = "/y"  # type: ignore[index]
    with pytest.raises(TypeError):
        s.backends["mlflow"] = {}  # type: ignore[index]
    assert hash(s) == hash(Settings(backends={"local": {"root": "/x"}}))


def test_settings_direct_construction_normalizes() -> None:
    s = Settings(backend="mlflow", shard_size="512MB", mode="MAX")  # type: ignore[arg-type]
    assert s.backend == ("mlflow",)
    assert s.shard_size == 512 * 1000**2
    assert s.mode == "max"
    assert Settings(backend=["a", "b"]).backend == ("a", "b")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'min' or 'max'"):
        Settings(mode="avg")
    with pytest.raises(ConfigError, match="max_in_flight"):
        Settings(max_in_flight=0)
    with pytest.raises(ConfigError, match="keep_last"):
        Retention(keep_last=0)


def test_backend_options_returns_copy_or_empty() -> None:
    s = Settings(backends={"local": {"root": "/x"}})
    opts = s.backend_options("local")
    assert opts == {"root": "/x"}
    opts["root"] = "/changed"
    assert s.backend_options("local") == {"root": "/x"}
    assert s.backend_options("mlflow") == {}


@pytest.mark.parametrize(
    ("kwargs", "enabled"),
    [({}, False), ({"keep_last": 1}, True), ({"keep_best": 2}, True),
     ({"keep_every": 100}, True), ({"metric": "acc", "mode": "max"}, False)],
)
def test_retention_enabled(kwargs: dict[str, Any], enabled: bool) -> None:
    assert Retention(**kwargs).enabled() is enabled


# --------------------------------------------------------------------------- file discovery


def test_find_config_file_none(tmp_path: Path) -> None:
    assert find_config_file(tmp_path) is None


def test_upward_search_from_nested_directory(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ckpt_track.toml", 'project = "proj"\n')
    nested = tmp_path / "a" / "b" / "c"
    nested.mkdir(parents=True)
    assert find_config_file(nested) == cfg.resolve()
    s = load(tmp_path, cwd=nested)
    assert s.project == "proj"
    assert s.sources["project"] == f"file:{cfg.resolve()}"


def test_pyproject_without_table_is_skipped(tmp_path: Path) -> None:
    found = pyproject(tmp_path, 'project = "outer"\n')
    inner = tmp_path / "pkg"
    write(inner / "pyproject.toml", "[project]\nname = 'inner'\n[tool.black]\nline-length = 99\n")
    assert find_config_file(inner) == found.resolve()
    assert load(tmp_path, cwd=inner).project == "outer"


def test_ckpt_track_toml_beats_pyproject_in_same_dir(tmp_path: Path) -> None:
    pyproject(tmp_path, 'backend = "wandb"\nproject = "from-pyproject"\n')
    cfg = write(tmp_path / "ckpt_track.toml", 'backend = "mlflow"\n')
    assert find_config_file(tmp_path) == cfg.resolve()
    s = load(tmp_path)
    assert s.backend == ("mlflow",)
    # only one file is used: nothing from the pyproject leaks in
    assert s.project == "default"


def test_nearer_pyproject_beats_farther_ckpt_track_toml(tmp_path: Path) -> None:
    write(tmp_path / "ckpt_track.toml", 'backend = "mlflow"\n')
    near = pyproject(tmp_path / "sub", 'backend = "wandb"\n')
    assert find_config_file(tmp_path / "sub") == near.resolve()
    assert load(tmp_path, cwd=tmp_path / "sub").backend == ("wandb",)


def test_ckpt_track_config_env_replaces_search(tmp_path: Path) -> None:
    write(tmp_path / "ckpt_track.toml", 'project = "searched"\n')
    explicit = write(tmp_path / "elsewhere" / "custom.toml", 'project = "explicit"\n')
    s = load(tmp_path, env={"CKPT_TRACK_CONFIG": str(explicit)})
    assert s.project == "explicit"
    assert s.sources["project"] == f"file:{explicit.resolve()}"


def test_ckpt_track_config_relative_to_cwd(tmp_path: Path) -> None:
    write(tmp_path / "conf" / "c.toml", 'project = "rel"\n')
    assert load(tmp_path, env={"CKPT_TRACK_CONFIG": "conf/c.toml"}).project == "rel"


def test_ckpt_track_config_may_be_a_pyproject(tmp_path: Path) -> None:
    p = pyproject(tmp_path / "x", 'project = "pp"\n')
    assert load(tmp_path, env={"CKPT_TRACK_CONFIG": str(p)}).project == "pp"


def test_ckpt_track_config_pyproject_without_table(tmp_path: Path) -> None:
    p = write(tmp_path / "x" / "pyproject.toml", "[project]\nname = 'x'\n")
    with pytest.raises(ConfigError, match=r"no \[tool.ckpt_track\] table"):
        load(tmp_path, env={"CKPT_TRACK_CONFIG": str(p)})


def test_ckpt_track_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CKPT_TRACK_CONFIG.*no such file"):
        load(tmp_path, env={"CKPT_TRACK_CONFIG": str(tmp_path / "nope.toml")})


def test_ckpt_track_config_empty_means_search(tmp_path: Path) -> None:
    write(tmp_path / "ckpt_track.toml", 'project = "searched"\n')
    assert load(tmp_path, env={"CKPT_TRACK_CONFIG": ""}).project == "searched"


# --------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ((), ("local",)),
        (("pyproject",), ("wandb",)),
        (("pyproject", "toml"), ("mlflow",)),
        (("pyproject", "toml", "env"), ("local", "mlflow")),
        (("pyproject", "toml", "env", "kwarg"), ("wandb", "local")),
        (("pyproject", "kwarg"), ("wandb", "local")),
        (("env",), ("local", "mlflow")),
        (("toml", "kwarg"), ("wandb", "local")),
    ],
)
def test_backend_precedence(
    tmp_path: Path, layers: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    if "pyproject" in layers:
        pyproject(tmp_path, 'backend = "wandb"\n')
    if "toml" in layers:
        write(tmp_path / "ckpt_track.toml", 'backend = ["mlflow"]\n')
    env = {"CKPT_TRACK_BACKEND": "local, mlflow"} if "env" in layers else {}
    overrides = {"backend": ["wandb", "local"]} if "kwarg" in layers else None
    assert load(tmp_path, overrides, env=env).backend == expected


def test_precedence_for_every_top_level_key(tmp_path: Path) -> None:
    write(
        tmp_path / "ckpt_track.toml",
        'project = "f"\nmonitor = "f/m"\nmode = "max"\nshard_size = 100\n'
        "blocking = true\nmax_in_flight = 2\n",
    )
    env = {
        "CKPT_TRACK_PROJECT": "e",
        "CKPT_TRACK_SHARD_SIZE": "1kB",
        "CKPT_TRACK_MAX_IN_FLIGHT": "3",
    }
    s = load(tmp_path, {"project": "k", "mode": None}, env=env)
    assert (s.project, s.monitor, s.mode) == ("k", "f/m", "max")
    assert (s.shard_size, s.blocking, s.max_in_flight) == (1000, True, 3)


def test_none_overrides_mean_not_given(tmp_path: Path) -> None:
    write(tmp_path / "ckpt_track.toml", 'project = "f"\n[retention]\nkeep_last = 2\n')
    s = load(
        tmp_path,
        {"project": None, "backend": None, "retention": {"keep_last": None}, "mlflow": None},
    )
    assert s.project == "f"
    assert s.retention.keep_last == 2
    assert "backend" not in s.sources


def test_retention_instance_as_override(tmp_path: Path) -> None:
    write(tmp_path / "ckpt_track.toml", '[retention]\nmetric = "acc"\n')
    s = load(tmp_path, {"retention": Retention(keep_best=2)})
    assert s.retention == Retention(keep_best=2, metric="acc")


def test_section_merge_across_sources(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "ckpt_track.toml",
        '[retention]\nmetric = "val/acc"\nmode = "max"\nkeep_last = 10\n'
        '[local]\nroot = "/file/root"\n'
        '[mlflow]\ntracking_uri = "file-uri"\nexperiment = "exp"\n',
    )
    env = {
        "CKPT_TRACK_RETENTION__KEEP_LAST": "3",
        "CKPT_TRACK_LOCAL__ROOT": "/env/root",
        "CKPT_TRACK_MLFLOW__TRACKING_URI": "env-uri",
    }
    overrides = {"retention": {"keep_best": 2}, "mlflow": {"tracking_uri": "http://kw"}}
    s = load(tmp_path, overrides, env=env)
    assert s.retention == Retention(keep_last=3, keep_best=2, metric="val/acc", mode="max")
    assert s.backend_options("local") == {"root": "/env/root"}
    assert s.backend_options("mlflow") == {"tracking_uri": "http://kw", "experiment": "exp"}
    file_src = f"file:{cfg.resolve()}"
    assert dict(s.sources) == {
        "retention.metric": file_src,
        "retention.mode": file_src,
        "retention.keep_last": "env:CKPT_TRACK_RETENTION__KEEP_LAST",
        "retention.keep_best": "kwarg",
        "local.root": "env:CKPT_TRACK_LOCAL__ROOT",
        "mlflow.tracking_uri": "kwarg",
        "mlflow.experiment": file_src,
    }


def test_sources_mapping(tmp_path: Path) -> None:
    cfg = pyproject(tmp_path, 'project = "p"\nmode = "max"\n')
    s = load(tmp_path, {"backend": "mlflow"}, env={"CKPT_TRACK_MODE": "min"})
    assert dict(s.sources) == {
        "project": f"file:{cfg.resolve()}",
        "mode": "env:CKPT_TRACK_MODE",
        "backend": "kwarg",
    }
    with pytest.raises(TypeError):
        s.sources["x"] = "y"  # type: ignore[index]


# --------------------------------------------------------------------------- env coercion


@pytest.mark.parametrize(
    ("var", "raw", "attr", "expected"),
    [
        ("CKPT_TRACK_BACKEND", "mlflow", "backend", ("mlflow",)),
        ("CKPT_TRACK_BACKEND", "mlflow,wandb", "backend", ("mlflow", "wandb")),
        ("CKPT_TRACK_BACKEND", " mlflow , wandb ,", "backend", ("mlflow", "wandb")),
        ("CKPT_TRACK_BACKEND", "local,local", "backend", ("local",)),
        ("CKPT_TRACK_PROJECT", "my proj", "project", "my proj"),
        ("CKPT_TRACK_MONITOR", "val/acc", "monitor", "val/acc"),
        ("CKPT_TRACK_MONITOR", "", "monitor", None),
        ("CKPT_TRACK_MONITOR", "None", "monitor", None),
        ("CKPT_TRACK_MODE", "max", "mode", "max"),
        ("CKPT_TRACK_MODE", " MIN ", "mode", "min"),
        ("CKPT_TRACK_SHARD_SIZE", "1048576", "shard_size", 1048576),
        ("CKPT_TRACK_SHARD_SIZE", "512MB", "shard_size", 512 * 1000**2),
        ("CKPT_TRACK_MAX_IN_FLIGHT", "4", "max_in_flight", 4),
        ("CKPT_TRACK_max_in_flight", "5", "max_in_flight", 5),
    ],
)
def test_env_coercion(tmp_path: Path, var: str, raw: str, attr: str, expected: Any) -> None:
    s = load(tmp_path, env={var: raw})
    assert getattr(s, attr) == expected
    assert s.sources[attr] == f"env:{var}"


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "Yes", "on", " On "])
def test_env_bool_true(tmp_path: Path, raw: str) -> None:
    assert load(tmp_path, env={"CKPT_TRACK_BLOCKING": raw}).blocking is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "NO", "off"])
def test_env_bool_false(tmp_path: Path, raw: str) -> None:
    write(tmp_path / "ckpt_track.toml", "blocking = true\n")
    assert load(tmp_path, env={"CKPT_TRACK_BLOCKING": raw}).blocking is False


def test_env_retention_coercion(tmp_path: Path) -> None:
    env = {
        "CKPT_TRACK_RETENTION__KEEP_LAST": "3",
        "CKPT_TRACK_RETENTION__KEEP_BEST": " 2 ",
        "CKPT_TRACK_retention__keep_every": "1000",
        "CKPT_TRACK_RETENTION__METRIC": "val/acc",
        "CKPT_TRACK_RETENTION__MODE": "MAX",
    }
    s = load(tmp_path, env=env)
    assert s.retention == Retention(
        keep_last=3, keep_best=2, keep_every=1000, metric="val/acc", mode="max"
    )
    assert s.sources["retention.keep_every"] == "env:CKPT_TRACK_retention__keep_every"


def test_env_can_unset_file_values(tmp_path: Path) -> None:
    write(tmp_path / "ckpt_track.toml", 'monitor = "loss"\n[retention]\nkeep_last = 4\n')
    s = load(tmp_path, env={"CKPT_TRACK_MONITOR": "none", "CKPT_TRACK_RETENTION__KEEP_LAST": ""})
    assert s.monitor is None
    assert s.retention.keep_last is None


def test_env_backend_section_values_stay_strings(tmp_path: Path) -> None:
    s = load(tmp_path, env={"CKPT_TRACK_WANDB__OFFLINE": "true", "CKPT_TRACK_Local__Root": "/d"})
    assert s.backend_options("wandb") == {"offline": "true"}
    assert s.backend_options("local") == {"root": "/d"}


def test_non_setting_env_is_ignored(tmp_path: Path) -> None:
    assert NON_SETTING_ENV == {"CKPT_TRACK_RUN_ID", "CKPT_TRACK_RUN_NAME", "CKPT_TRACK_CONFIG"}
    env = {
        "CKPT_TRACK_RUN_ID": "abc",
        "CKPT_TRACK_RUN_NAME": "n",
        "OTHER_VAR": "x",
        "CKPT_TRACKER": "y",  # not the prefix: CKPT_TRACK_ is required
    }
    assert load(tmp_path, env=env) == Settings()


# --------------------------------------------------------------------------- file values


def test_file_values_of_every_type(tmp_path: Path) -> None:
    write(
        tmp_path / "ckpt_track.toml",
        'backend = ["mlflow", "local"]\nproject = "p"\nmonitor = ""\nmode = "max"\n'
        'shard_size = "2GiB"\nblocking = true\nmax_in_flight = 3\n'
        '[retention]\nkeep_last = 1\nkeep_every = 5\n'
        '[wandb]\noffline = true\n',
    )
    s = load(tmp_path)
    assert s.backend == ("mlflow", "local")
    assert s.monitor is None
    assert s.shard_size == 2 * 1024**3
    assert s.blocking is True
    assert s.max_in_flight == 3
    assert s.retention == Retention(keep_last=1, keep_every=5)
    assert s.backend_options("wandb") == {"offline": True}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1, 1), ("100", 100), ("100B", 100), ("100kB", 100_000), ("100KB", 100_000),
        ("512MB", 512_000_000), ("2GB", 2_000_000_000), ("1TB", 10**12),
        ("4KiB", 4096), ("512MiB", 512 * 1024**2), ("2GiB", 2 * 1024**3),
        ("1.5GiB", 3 * 1024**3 // 2), ("512 mib", 512 * 1024**2),
    ],
)
def test_shard_size_parsing(tmp_path: Path, raw: Any, expected: int) -> None:
    assert load(tmp_path, {"shard_size": raw}).shard_size == expected


@pytest.mark.parametrize("raw", [0, -1, "0MB", "abc", "12XB", "MB", "", True, 1.5, "-5MB"])
def test_shard_size_invalid(tmp_path: Path, raw: Any) -> None:
    with pytest.raises(ConfigError, match="shard_size.*keyword argument.*positive size"):
        load(tmp_path, {"shard_size": raw})


# --------------------------------------------------------------------------- errors


def test_typo_top_level_key_in_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ckpt_track.toml", 'bakend = "mlflow"\n')
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    msg = str(info.value)
    assert "unknown setting 'bakend'" in msg
    assert "Did you mean 'backend'?" in msg
    assert str(cfg.resolve()) in msg
    assert ("Valid keys: backend, blocking, collective_timeout, distributed, incremental, max_in_flight, mode, "
            "monitor, overlap, project, retries, shard_size, timeout") in msg
    assert "sections: retention, local, mlflow, wandb" in msg


def test_typo_top_level_key_in_pyproject(tmp_path: Path) -> None:
    cfg = pyproject(tmp_path, "max_inflight = 2\n")
    with pytest.raises(ConfigError, match="Did you mean 'max_in_flight'") as info:
        load(tmp_path)
    assert str(cfg.resolve()) in str(info.value)


def test_typo_key_in_kwargs(tmp_path: Path) -> None:
    expected = r"'projet' \(keyword argument\)\. Did you mean 'project'"
    with pytest.raises(ConfigError, match=expected):
        load(tmp_path, {"projet": "x"})


def test_unknown_key_without_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {"zzzzzz": 1})
    assert "Did you mean" not in str(info.value)
    assert "Valid keys" in str(info.value)


def test_typo_retention_key(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ckpt_track.toml", "[retention]\nkeep_lst = 3\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    msg = str(info.value)
    assert "unknown key 'keep_lst' in section [retention]" in msg
    assert "Did you mean 'keep_last'" in msg
    assert str(cfg.resolve()) in msg
    assert "keep_best, keep_every, keep_last, metric, mode" in msg


@pytest.mark.parametrize(
    ("var", "suggestion"),
    [
        ("CKPT_TRACK_BAKEND", "CKPT_TRACK_BACKEND"),
        ("CKPT_TRACK_PROJCT", "CKPT_TRACK_PROJECT"),
        ("CKPT_TRACK_RETENTION_KEEP_LAST", "CKPT_TRACK_RETENTION__KEEP_LAST"),
        ("CKPT_TRACK_RETENTION__KEEP_LST", "CKPT_TRACK_RETENTION__KEEP_LAST"),
        ("CKPT_TRACK_MLFLOW__TRACKING_URL", "CKPT_TRACK_MLFLOW__TRACKING_URI"),
        ("CKPT_TRACK_MLFLOW_TRACKING_URI", "CKPT_TRACK_MLFLOW__TRACKING_URI"),
        ("CKPT_TRACK_RUNID", "CKPT_TRACK_RUN_ID"),
    ],
)
def test_typo_env_var(tmp_path: Path, var: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env={var: "x"})
    msg = str(info.value)
    assert f"unknown environment variable {var}" in msg
    assert f"Did you mean {suggestion}" in msg


@pytest.mark.parametrize(
    "var", ["CKPT_TRACK_RETENTION", "CKPT_TRACK_LOCAL", "CKPT_TRACK_", "CKPT_TRACK_MODE__X"]
)
def test_env_var_that_is_not_a_value(tmp_path: Path, var: str) -> None:
    with pytest.raises(ConfigError, match="unknown environment variable"):
        load(tmp_path, env={var: "1"})


def test_typo_section_in_file(tmp_path: Path) -> None:
    write(tmp_path / "ckpt_track.toml", '[mlflw]\ntracking_uri = "x"\n')
    with pytest.raises(ConfigError, match="unknown setting 'mlflw'.*Did you mean 'mlflow'"):
        load(tmp_path)


def test_typo_section_in_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Did you mean CKPT_TRACK_LOCAL__ROOT"):
        load(tmp_path, env={"CKPT_TRACK_LOCL__ROOT": "/x"})


def test_typo_backend_option_in_file(tmp_path: Path) -> None:
    write(tmp_path / "ckpt_track.toml", '[mlflow]\ntracking_url = "x"\n')
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    msg = str(info.value)
    assert "unknown key 'tracking_url' in section [mlflow]" in msg
    assert "Did you mean 'tracking_uri'?" in msg
    assert "Valid keys for [mlflow]: experiment, tracking_uri." in msg


def test_typo_backend_option_in_kwargs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'rot' in section \[local\] \(keyword argument\)"):
        load(tmp_path, {"local": {"rot": "/x"}})


def test_section_must_be_a_table(tmp_path: Path) -> None:
    write(tmp_path / "ckpt_track.toml", 'retention = 3\n')
    with pytest.raises(ConfigError, match="section 'retention'.*must be a table"):
        load(tmp_path)
    with pytest.raises(ConfigError, match="section 'local'.*must be a table"):
        empty = write(tmp_path / "e.toml", "")
        load(tmp_path, {"local": "/x"}, env={"CKPT_TRACK_CONFIG": str(empty)})


@pytest.mark.parametrize("source", ["file", "env", "kwarg"])
def test_bad_mode(tmp_path: Path, source: str) -> None:
    env: dict[str, str] = {}
    overrides = None
    if source == "file":
        write(tmp_path / "ckpt_track.toml", 'mode = "avg"\n')
    elif source == "env":
        env = {"CKPT_TRACK_MODE": "avg"}
    else:
        overrides = {"mode": "avg"}
    with pytest.raises(ConfigError, match=r"invalid value 'avg' for .*mode.*'min' or 'max'"):
        load(tmp_path, overrides, env=env)


def test_bad_retention_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"retention\.mode.*'min' or 'max'"):
        load(tmp_path, {"retention": {"mode": "best"}})


@pytest.mark.parametrize(
    ("var", "raw", "expected"),
    [
        ("CKPT_TRACK_MAX_IN_FLIGHT", "two", "an integer >= 1"),
        ("CKPT_TRACK_MAX_IN_FLIGHT", "0", "an integer >= 1"),
        ("CKPT_TRACK_RETENTION__KEEP_LAST", "3.5", "an integer >= 1"),
        ("CKPT_TRACK_RETENTION__KEEP_EVERY", "-1", "an integer >= 1"),
        ("CKPT_TRACK_BLOCKING", "maybe", "a boolean"),
        ("CKPT_TRACK_SHARD_SIZE", "lots", "a positive size"),
        ("CKPT_TRACK_BACKEND", " , ", "a backend name"),
        ("CKPT_TRACK_PROJECT", "  ", "a non-empty string"),
    ],
)
def test_bad_env_value(tmp_path: Path, var: str, raw: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env={var: raw})
    msg = str(info.value)
    assert f"environment variable {var}" in msg
    assert expected in msg


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ('[retention]\nkeep_last = "three"\n', "retention.keep_last", "an integer >= 1"),
        ("[retention]\nkeep_best = 0\n", "retention.keep_best", "an integer >= 1"),
        ("[retention]\nkeep_last = true\n", "retention.keep_last", "an integer >= 1"),
        ("max_in_flight = 1.5\n", "max_in_flight", "an integer >= 1"),
        ('blocking = "yes"\n', "blocking", "a boolean"),
        ("backend = 3\n", "backend", "a backend name"),
        ('backend = ["mlflow", 3]\n', "backend", "a backend name"),
        ("backend = []\n", "backend", "at least one"),
        ("project = 5\n", "project", "a non-empty string"),
        ("monitor = 5\n", "monitor", "a string"),
    ],
)
def test_wrong_type_in_file(tmp_path: Path, toml: str, key: str, expected: str) -> None:
    cfg = write(tmp_path / "ckpt_track.toml", toml)
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    msg = str(info.value)
    assert repr(key) in msg
    assert f"config file {cfg.resolve()}" in msg
    assert expected in msg


def test_kwargs_are_not_parsed_like_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a boolean"):
        load(tmp_path, {"blocking": "yes"})
    with pytest.raises(ConfigError, match="an integer >= 1"):
        load(tmp_path, {"max_in_flight": "2"})


def test_shadowed_bad_file_value_still_reported(tmp_path: Path) -> None:
    write(tmp_path / "ckpt_track.toml", 'mode = "avg"\n')
    with pytest.raises(ConfigError, match="config file"):
        load(tmp_path, {"mode": "max"})


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ckpt_track.toml", 'project = "x"\nmode = = "max"\n')
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert f"{cfg.resolve()}:2" in str(info.value)


def test_toml_syntax_error_in_pyproject_during_search(tmp_path: Path) -> None:
    cfg = write(tmp_path / "pyproject.toml", "[tool.ckpt_track\n")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        find_config_file(tmp_path)
    assert f"{cfg.resolve()}:1" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "env", "toml"),
    [
        ({"backend": "mlfow"}, {}, ""),
        (None, {"CKPT_TRACK_BACKEND": "local,nope"}, ""),
        (None, {}, 'backend = ["wandb", "comet"]\n'),
    ],
)
def test_unknown_backend_name(
    tmp_path: Path, overrides: Any, env: dict[str, str], toml: str
) -> None:
    write(tmp_path / "ckpt_track.toml", toml)
    with pytest.raises(UnknownBackend) as info:
        load(tmp_path, overrides, env=env).checked_backends()
    assert isinstance(info.value, ConfigError)
    assert info.value.known == ["local", "mlflow", "wandb"]
    assert "known backends: local, mlflow, wandb" in str(info.value)


# --------------------------------------------------------------------------- registry


def _fake_registry(monkeypatch: pytest.MonkeyPatch, calls: list[int]) -> None:
    def backend_options_table() -> dict[str, frozenset[str]]:
        calls.append(1)
        return {"local": frozenset({"root"}), "fake": frozenset({"url"})}

    package = types.ModuleType("ckpt_track.backends")
    package.__path__ = []  # type: ignore[attr-defined]
    registry = types.ModuleType("ckpt_track.backends.registry")
    registry.backend_options_table = backend_options_table  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ckpt_track.backends", package)
    monkeypatch.setitem(sys.modules, "ckpt_track.backends.registry", registry)


def test_backend_sections_default_to_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    _fake_registry(monkeypatch, calls)
    s = load_settings({"backend": "fake", "fake": {"url": "u"}}, cwd=tmp_path, env={})
    assert s.backend == ("fake",)
    assert s.backend_options("fake") == {"url": "u"}
    assert calls == [1]
    with pytest.raises(UnknownBackend):
        load_settings({"backend": "mlflow"}, cwd=tmp_path, env={}).checked_backends()


def test_registry_not_consulted_for_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    _fake_registry(monkeypatch, calls)
    s = load_settings({"project": "p", "retention": {"keep_last": 2}}, cwd=tmp_path, env={})
    assert s.project == "p"
    assert calls == []
