"""Build hook: ship the top-level ``templates/`` directory inside the package as ``dre_hpc/templates``.

Everything else is configured in setup.cfg. In a source checkout (also ``pip install -e .``)
``dre_hpc.batch.render`` finds the templates in ``templates/`` itself; a wheel (``pip install .``,
``pip wheel .``, ``python -m build``) carries a copy made here, so an installed package renders
job scripts without the source tree.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TEMPLATES = Path(__file__).resolve().parent / "templates"


class build_py_with_templates(build_py):
    """build_py that also copies ``templates/*`` to ``<build_lib>/dre_hpc/templates/``."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "dre_hpc" / "templates"
        self.mkpath(str(target))
        for source in sorted(TEMPLATES.iterdir()):
            if source.is_file():
                self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": build_py_with_templates})
