"""Strip per-cell timing metadata and set the python3 kernelspec, after executing a notebook.

The widget state that execution stored is kept: the book renders widgets from it.

Usage: python tools/strip_notebook.py nbs/NN_topic.ipynb [...]
(tests/test_book.py::test_notebook_hygiene checks both.)
"""

import json
import sys

for path in sys.argv[1:]:
    with open(path) as fh:
        nb = json.load(fh)
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)
    widgets = nb["metadata"].get("widgets")
    nb["metadata"] = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": nb["metadata"].get("language_info", {"name": "python"}),
    }
    if widgets:  # ipywidgets' saved state: the book renders the widgets from it (ARCHITECTURE.md, "Measured decisions")
        nb["metadata"]["widgets"] = widgets
    with open(path, "w") as fh:
        json.dump(nb, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
