"""Hub entry point: ``model.generate(..., custom_generate=<repo>, trust_remote_code=True)``.

transformers calls ``generate(model=..., **generate_arguments)`` with the
arguments of ``model.generate`` (``inputs``, ``generation_config``,
``assistant_model``, ``streamer``, ...); they are passed on unchanged to
:func:`hf_globalres.generate`, which needs ``pip install hf-globalres``.
"""

import hf_globalres


def generate(model, *args, **kwargs):
    """Multi-draft speculative sampling; see ``hf_globalres.generate`` for the keywords."""
    return hf_globalres.generate(model, *args, **kwargs)
