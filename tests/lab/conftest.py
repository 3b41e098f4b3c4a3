"""One lab shared by the balancer-pair and rolling-upgrade tests (building one takes ~20 s).

Its own prefix and work directory. A test module that breaks a part of it brings that
part back before it ends (see each module), so the next one finds the whole lab.
"""

from __future__ import annotations

import os

import pytest

from lab.runner import Lab


@pytest.fixture(scope="package")
def site_lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    lab = Lab(workdir=tmp_path_factory.mktemp("site") / "work", prefix=f"aplsl{os.getpid() % 100000}-", say=lambda _: None)
    try:
        lab.build()
        lab.start_services()
        yield lab
    finally:
        lab.down()
