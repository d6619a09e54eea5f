"""Publish the multi-draft ``custom_generate`` recipe to a Hub repository.

    python examples/push_custom_generate.py <user>/multi-draft-speculative [--private]

Uploads ``README.md`` (with the ``custom_generate`` tag) to the repository
root and ``generate.py`` and ``requirements.txt`` to ``custom_generate/``.
Afterwards anyone can run

    model.generate(**inputs, custom_generate="<user>/multi-draft-speculative", trust_remote_code=True,
                   assistant_model=draft, num_drafts=4)
"""

from __future__ import annotations

import argparse

from huggingface_hub import HfApi

from hf_globalres.custom_generate import REPOSITORY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id", help="Hub repository, e.g. user/multi-draft-speculative")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()
    folder = REPOSITORY / "custom_generate"
    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    api.upload_file(path_or_fileobj=str(folder / "README.md"), path_in_repo="README.md", repo_id=args.repo_id)
    for name in ("generate.py", "requirements.txt"):
        target = f"custom_generate/{name}"
        api.upload_file(path_or_fileobj=str(folder / name), path_in_repo=target, repo_id=args.repo_id)
    print(f"pushed: model.generate(..., custom_generate={args.repo_id!r}, trust_remote_code=True)")


if __name__ == "__main__":
    main()
