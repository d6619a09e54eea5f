"""The ``custom_generate/`` folder transformers loads with ``custom_generate=<repo>``.

transformers expects a repository holding ``custom_generate/generate.py``; the
installed package is such a repository, so pass :data:`REPOSITORY`:

    >>> from hf_globalres.custom_generate import REPOSITORY
    >>> model.generate(**inputs, custom_generate=str(REPOSITORY), trust_remote_code=True,
    ...                assistant_model=draft, num_drafts=4)  # doctest: +SKIP

``examples/push_custom_generate.py`` uploads the same files to a Hub repository.
"""

from pathlib import Path

#: Folder whose ``custom_generate/`` subfolder holds ``generate.py``, ``requirements.txt`` and ``README.md``.
REPOSITORY = Path(__file__).resolve().parent.parent

__all__ = ["REPOSITORY"]
