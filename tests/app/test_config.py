import re
import subprocess

import pytest

from app.config import load_settings
from common.configfile import ConfigError
from tests.helpers import PYTHON, REPO


def test_defaults_are_safe(tmp_path):
    (tmp_path / "none.toml").write_text("")
    s = load_settings({"ZIMAGE_CONFIG": str(tmp_path / "none.toml")})
    assert s.host == "127.0.0.1"  # loopback unless the operator says otherwise
    assert s.is_demo_model and s.model_dir is None
    assert s.outputs_dir.is_absolute()


def test_file_then_env_precedence(tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text("[app]\nport = 9000\nqueue_size = 3\n")
    s = load_settings({"ZIMAGE_CONFIG": str(cfg), "ZIMAGE_APP_QUEUE_SIZE": "5"})
    assert s.port == 9000 and s.queue_size == 5


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"ZIMAGE_APP_PORT": "99999"}, "app.port"),
        ({"ZIMAGE_APP_MAX_SIZE": "1000"}, "not a multiple of 64"),
        ({"ZIMAGE_APP_MODEL_DIR": "/nonexistent/model"}, "model_index.json"),
        ({"ZIMAGE_APP_DEVICE": "tpu"}, "device"),
    ],
)
def test_invalid_values_are_one_clear_line(env, needle):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_unknown_environment_variables_are_ignored(tmp_path):
    """Only known fields are read from ZIMAGE_APP_*: a stray variable changes nothing."""
    (tmp_path / "none.toml").write_text("")
    base = {"ZIMAGE_CONFIG": str(tmp_path / "none.toml")}
    assert load_settings({**base, "ZIMAGE_APP_BOGUS": "1"}) == load_settings(base)


def test_unknown_key_in_file_is_an_error(tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text('[app]\nmem_limit = "10G"\n')
    with pytest.raises(ConfigError, match="mem_limit"):
        load_settings({"ZIMAGE_CONFIG": str(cfg)})


def test_bad_config_exits_2_before_loading_the_model(tmp_path):
    env = {
        "ZIMAGE_CONFIG": str(tmp_path / "none.toml"),
        "ZIMAGE_APP_MIN_SIZE": "100",
        "PATH": "/usr/bin:/bin",
    }
    (tmp_path / "none.toml").write_text("")
    proc = subprocess.run(
        [PYTHON, "-m", "app"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "min_size" in proc.stderr


@pytest.mark.parametrize("module,section", [("app", "APP"), ("monitor", "MONITOR")])
def test_help_says_where_configuration_comes_from_and_unknown_arguments_fail(module, section):
    shown = subprocess.run(
        [PYTHON, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0 and "zimage.toml" in shown.stdout and f"ZIMAGE_{section}_" in shown.stdout
    bad = subprocess.run(
        [PYTHON, "-m", module, "--port", "1"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "unrecognized arguments: --port 1" in bad.stderr


@pytest.mark.parametrize(
    "env,needle",
    [
        (
            {"ZIMAGE_APP_REQUEST_TIMEOUT_S": "200"},
            "app.request_timeout_s (200 s) must be ≤ app.drain_timeout_s (150 s)",
        ),
        (
            {"ZIMAGE_APP_DRAIN_TIMEOUT_S": "180"},
            "app.drain_timeout_s (180 s) must be < supervisord stopwaitsecs",
        ),
        ({"ZIMAGE_MONITOR_STOP_TIMEOUT_S": "170"}, "must be < monitor.stop_timeout_s (170 s)"),
        (
            {"ZIMAGE_MONITOR_LOOP_STALL_S": "100"},
            "monitor.loop_stall_s (100 s) must be > monitor.warmup_timeout_s + interval_s (121 s)",
        ),
        (
            {"ZIMAGE_MONITOR_DRAIN_ABANDONED_S": "150"},
            "monitor.drain_abandoned_s (150 s) must be > app.drain_timeout_s (150 s)",
        ),
        (
            {"ZIMAGE_MONITOR_STALL_MAX_S": "5"},
            "monitor.stall_max_s (5 s) must be >= monitor.stall_min_s (10 s)",
        ),
    ],
)
def test_a_broken_timeout_chain_is_one_clear_line(tmp_path, env, needle):
    from monitor.config import load_monitor_settings

    (tmp_path / "none.toml").write_text("")
    full = {"ZIMAGE_CONFIG": str(tmp_path / "none.toml"), **env}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_settings(full)
        load_monitor_settings(full)


def test_the_defaults_keep_the_timeout_chain(tmp_path):
    from common.contract import supervisor_stopwaitsecs
    from monitor.config import load_monitor_settings

    (tmp_path / "none.toml").write_text("")
    env = {"ZIMAGE_CONFIG": str(tmp_path / "none.toml")}
    app, monitor = load_settings(env), load_monitor_settings(env)
    assert app.request_timeout_s <= app.drain_timeout_s < supervisor_stopwaitsecs() < monitor.stop_timeout_s
    assert app.drain_timeout_s < monitor.drain_abandoned_s
    # no warm stage may stay silent longer than a whole generation may take
    assert monitor.stall_max_s == app.request_timeout_s
    longer = load_monitor_settings({**env, "ZIMAGE_APP_REQUEST_TIMEOUT_S": "140"})
    assert longer.stall_max_s == 140


def test_lora_dir_must_be_a_directory_and_does_not_combine_with_fp8(tmp_path):
    (tmp_path / "none.toml").write_text("")
    base = {"ZIMAGE_CONFIG": str(tmp_path / "none.toml"), "ZIMAGE_HOME": str(tmp_path)}
    with pytest.raises(ConfigError, match="is not a directory"):
        load_settings({**base, "ZIMAGE_APP_LORA_DIR": "loras"})
    (tmp_path / "loras").mkdir()
    assert load_settings({**base, "ZIMAGE_APP_LORA_DIR": "loras"}).lora_dir == tmp_path / "loras"
    with pytest.raises(ConfigError, match="fp8"):
        load_settings({**base, "ZIMAGE_APP_LORA_DIR": "loras", "ZIMAGE_APP_QUANTIZE": "fp8"})


def test_cuda_graph_modes_are_refused_where_they_cannot_work(tmp_path):
    (tmp_path / "none.toml").write_text("")
    base = {"ZIMAGE_CONFIG": str(tmp_path / "none.toml"), "ZIMAGE_APP_COMPILE_MODE": "reduce-overhead"}
    with pytest.raises(ConfigError, match="compile_backend = 'jit'"):  # the default backend is aot
        load_settings(base)
    jit = {**base, "ZIMAGE_APP_COMPILE_BACKEND": "jit"}
    assert load_settings(jit).compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="offload = 'none'"):
        load_settings({**jit, "ZIMAGE_APP_OFFLOAD": "model"})
    with pytest.raises(ConfigError, match="parallel = 'none'"):
        load_settings({**jit, "ZIMAGE_APP_PARALLEL": "context"})
    with pytest.raises(ConfigError, match="compile_mode"):  # a typo is one line, not a compile error later
        load_settings({**jit, "ZIMAGE_APP_COMPILE_MODE": "reduce_overhead"})
    assert (
        load_settings({**base, "ZIMAGE_APP_COMPILE_MODE": "max-autotune-no-cudagraphs"}).compile_backend
        == "aot"
    )
