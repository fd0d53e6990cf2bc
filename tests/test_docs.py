"""The documentation: generated parts match the registry, the README stays a short tour, links resolve."""
import re

import fairseq_helpers as H


def _generator():
    return H.load_script("docs/generate.py", "docs_generate")


def test_generated_docs_are_up_to_date():
    stale = [str(path.relative_to(H.REPO)) for path, content in _generator().render().items()
             if path.read_text() != content]
    assert not stale, f"{stale} differ from what the registry generates: run make docs"


def test_reference_lists_every_attention_and_no_test_architecture():
    from fluence_fairseq.modules import ATTENTIONS

    reference = (H.REPO / "docs" / "reference.md").read_text()
    assert all(f"| `{name}` (" in reference for name in ATTENTIONS)
    assert "_tiny` |" not in reference and "| `transformer_lm_local` |" in reference


def test_readme_is_a_short_tour_whose_links_resolve():
    readme = (H.REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250 and "make demo" in readme and "make test" in readme
    pages = sorted((H.REPO / "docs").glob("*.md"))
    for page in [H.REPO / "README.md", *pages]:
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    linked = set(re.findall(r"\(docs/([\w.]+\.md)", readme))
    assert {p.name for p in pages} <= linked, "every docs page is linked from the README"
