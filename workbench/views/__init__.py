"""Views, one module per noun. Each parses with a form, calls one action and
renders or redirects; project-scoped lookups go through workbench.shortcuts."""
