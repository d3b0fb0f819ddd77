"""`localist serve` takes vLLM's engine flags from vLLM's own definitions; those the localist model
cannot honour are refused at start, with the reason, before anything loads."""
import subprocess
import sys

import pytest

from localist.clients.cli import main
from localist.server.engine_flags import engine_overrides


def test_engine_flags_pass_through_as_vllm_parses_them():
    overrides = engine_overrides(["--tensor-parallel-size", "2", "--max-num-seqs", "4", "--no-enable-prefix-caching",
                                  "--kv-cache-memory-bytes", "1G", "--seed", "7"])
    assert overrides == {"tensor_parallel_size": 2, "max_num_seqs": 4, "enable_prefix_caching": False,
                         "kv_cache_memory_bytes": 1 << 30, "seed": 7}
    assert engine_overrides([]) == {}
    assert engine_overrides(["--enforce-eager"]) == {}  # localist runs eagerly anyway


@pytest.mark.parametrize("argv, reason", [
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'], "speculative decoding"),
    (["--compilation-config", '{"mode": 3}'], "torch.compile"),
    (["--kv-cache-dtype", "fp8"], "quantized KV cache"),
    (["--pipeline-parallel-size", "2"], "--tensor-parallel-size"),
    (["--served-model-name", "other"], "--name"),
    (["--no-such-flag", "1"], "not vLLM's"),
])
def test_flags_the_localist_model_cannot_honour_are_refused(argv, reason):
    with pytest.raises(ValueError, match=reason):
        engine_overrides(argv)


def test_serve_refuses_before_loading_anything(capsys):
    assert main(["serve", "--kv-cache-dtype", "fp8_e4m3"]) == 2
    assert "--kv-cache-dtype: a quantized KV cache" in capsys.readouterr().err


def test_other_commands_still_reject_unknown_flags():
    with pytest.raises(SystemExit) as exited:
        main(["keys", "list", "--tensor-parallel-size", "2"])
    assert exited.value.code == 2


def test_help_shows_vllms_groups_and_localists_flags():
    out = subprocess.run([sys.executable, "-m", "localist.clients.cli", "serve", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for group in ("ParallelConfig:", "CacheConfig:", "SchedulerConfig:", "localist:"):
        assert group in out
    for flag in ("--tensor-parallel-size", "--max-num-seqs", "--allow-dev-mode-on-network", "--model MODEL"):
        assert flag in out


def test_the_session_server_runs_with_a_passed_engine_flag(localist_server):
    assert "max_num_seqs 48; engine flags {'max_num_seqs': 48}" in localist_server.log_path.read_text()
