"""A non-editable install into a fresh venv ships mergejax.kernels / mergejax.converters and
puts no generic `kernels` or `converters` package into site-packages."""

import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fresh_venv_install(tmp_path):
    env_dir = tmp_path / "venv"
    # System site packages provide the (large) dependencies; the package itself is installed
    # into the venv, non-editable, from a copy-free build of this checkout.
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT)], check=True, cwd=tmp_path, timeout=600)
    site = Path(subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    assert (site / "mergejax" / "kernels" / "__init__.py").is_file()
    assert (site / "mergejax" / "converters" / "__init__.py").is_file()
    assert not (site / "kernels").exists() and not (site / "converters").exists()
    probe = ("import mergejax, mergejax.kernels, mergejax.converters, mergejax.methods; "
             "print(mergejax.kernels.__file__); print(mergejax.converters.__file__)")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.split():
        assert line.startswith(str(site)), line  # the installed copy, not this checkout
