"""astraea.passes: the torch.fx passes that rewrite an exported vDiT into its token-wise form.

The pipeline (an explicit ordered list, one pass per file) lands with the graph-rewrite issue.
"""
