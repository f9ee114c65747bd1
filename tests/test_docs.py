"""Every file the documentation points to exists.

Results pages move (the current run is docs/results.md, an earlier one becomes docs/results_run<N>.md) and recipes,
tools and reports are renamed; a page that still links the old path sends a reader nowhere.
"""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# a repository path written in backticks, as README.md and examples/README.md cite pages and scripts
CODE_PATH = re.compile(r"`((?:docs|examples|tools|tests|kernels|megatron_hypenet)/[\w./-]+\.(?:md|py|yaml|json|png|log))`")


def pages():
    found = []
    for folder, _, names in os.walk(os.path.join(REPO, "docs")):
        found += [os.path.join(folder, n) for n in names if n.endswith(".md")]
    return sorted(found) + [os.path.join(REPO, "README.md"), os.path.join(REPO, "examples", "README.md")]


def missing_targets(page):
    text = open(page, encoding="utf-8").read()
    missing = []
    for target in MARKDOWN_LINK.findall(text):
        path = target.split("#")[0]
        if path and not re.match(r"[a-z]+:", path) and not os.path.exists(os.path.join(os.path.dirname(page), path)):
            missing.append(target)
    missing += [p for p in CODE_PATH.findall(text) if not os.path.exists(os.path.join(REPO, p))]
    return missing


@pytest.mark.parametrize("page", pages(), ids=lambda p: os.path.relpath(p, REPO))
def test_every_linked_file_exists(page):
    assert missing_targets(page) == [], f"{os.path.relpath(page, REPO)} points to files that do not exist"


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "here.md").write_text("x")
    page.write_text("[ok](here.md) [anchor](#top) [web](https://example.com) [gone](results_run99.md#x) "
                    "`docs/no_such_page.md`")
    assert missing_targets(str(page)) == ["results_run99.md#x", "docs/no_such_page.md"]
