# Only job: ship the top-level ops/, quant/, runtime/ folders as ascend_v4.ops / .quant / .runtime
# (code-style.md §7). The find_packages(top) loop keeps new subpackages from silently missing the wheel.
from setuptools import find_packages, setup

MAPPED = ("ops", "quant", "runtime")
packages = find_packages(include=["ascend_v4", "ascend_v4.*"])
for top in MAPPED:
    packages.append(f"ascend_v4.{top}")
    packages += [f"ascend_v4.{top}.{sub}" for sub in find_packages(top)]
setup(packages=packages, package_dir={f"ascend_v4.{top}": top for top in MAPPED})
