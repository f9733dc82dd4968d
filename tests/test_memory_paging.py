"""NumPy's huge-page advice switched off for a run (``numpy_hugepages`` in conf/config.yaml,
:func:`ldsc.profiling.numpy_hugepages`). Each check runs in a fresh interpreter: the setting is
process-wide."""

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.parametrize("import_numpy_first", [False, True])
def test_numpy_hugepage_advice_is_switched_off_before_or_after_numpy_is_imported(import_numpy_first):
    code = textwrap.dedent(f"""
        import os
        if {import_numpy_first}:
            import numpy
        from ldsc.profiling import numpy_hugepages
        numpy_hugepages(False)
        import numpy as np
        core = getattr(np, "_core", None) or np.core
        # the switch returns the setting it replaces: what numpy_hugepages left
        print(os.environ.get("NUMPY_MADVISE_HUGEPAGE"), core.multiarray._set_madvise_hugepage(True))
    """)
    env_value, previous = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                         check=True).stdout.split()
    assert previous == "False"
    assert env_value == ("None" if import_numpy_first else "0")


def test_null_leaves_numpy_as_it_is():
    code = textwrap.dedent("""
        import os
        from ldsc.profiling import numpy_hugepages
        numpy_hugepages(None)
        import numpy as np
        core = getattr(np, "_core", None) or np.core
        print(os.environ.get("NUMPY_MADVISE_HUGEPAGE"), core.multiarray._set_madvise_hugepage(True))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={k: v for k, v in __import__("os").environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"})
    assert out.stdout.split() == ["None", "True"]  # NumPy's default: advice on
