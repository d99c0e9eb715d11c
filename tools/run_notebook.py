"""Execute notebooks top to bottom in place, as `jupyter nbconvert --execute --inplace` does, but leave the `#| gpu`
cells unrun (no outputs) — for storing a chapter's outputs on a machine without CUDA.

    python tools/run_notebook.py nbs/10_offload.ipynb [more notebooks...]
"""
import re, sys
from pathlib import Path
import nbformat
from nbclient import NotebookClient

class Client(NotebookClient):
    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        if cell.cell_type == 'code' and re.search(r'^#\|\s*gpu\b', cell.source, re.M):
            cell.outputs, cell.execution_count = [], None
            return cell
        return await super().async_execute_cell(cell, cell_index, execution_count, store_history)

for path in sys.argv[1:]:
    p = Path(path)
    nb = nbformat.read(p, as_version=4)
    Client(nb, timeout=3600, kernel_name='python3', resources={'metadata': {'path': str(p.parent)}}).execute()
    nbformat.write(nb, p)
    print('ran', p)
