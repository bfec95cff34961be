"""train.allocator: which malloc the ranks of `mshg train --ranks N` run with (tcmalloc made the CPU recipe's
real path 1.3x faster, docs/results/throughput.md). The real preload is checked by a real two-rank training
(tests/test_elastic_resume.py: "tcmalloc malloc" in its log where the library is installed); here, the choice."""
import ctypes.util

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.distributed import allocator_preload
from tests.conftest import REPO

pytestmark = pytest.mark.quick
CPU = {"DS_ACCELERATOR": "cpu"}


def test_auto_preloads_tcmalloc_on_cpu_ranks_only_where_installed():
    installed = ctypes.util.find_library("tcmalloc_minimal")
    assert allocator_preload("auto", CPU) == installed
    assert allocator_preload("auto", {"DS_ACCELERATOR": "cuda"}) is None  # GPU ranks: glibc's
    assert allocator_preload("auto", {}) is None
    assert allocator_preload("system", CPU) is None
    assert allocator_preload("tcmalloc", {**CPU, "LD_PRELOAD": "/opt/mine.so"}) is None  # the user's preload stays


def test_tcmalloc_asked_for_but_missing_says_what_to_install(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)  # a machine without the package
    with pytest.raises(ConfigError, match=r"train.allocator=tcmalloc, but libtcmalloc_minimal.so.4 is not installed "
                                          r"\(Debian/Ubuntu: apt install libtcmalloc-minimal4\)"):
        allocator_preload("tcmalloc", CPU)
    assert allocator_preload("auto", CPU) is None  # auto falls back to glibc's quietly


def test_an_unknown_allocator_is_refused():
    with pytest.raises(ConfigError, match="train.allocator must be one of auto, tcmalloc, system; got 'jemalloc'"):
        load_config(REPO / "configs" / "lspet_cpu.yaml", ["train.allocator=jemalloc"])
