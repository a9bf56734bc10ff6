"""Prints the failure codes as the README's Markdown table."""

from jobmesh.codes import markdown_table

print(markdown_table())
