"""The `merging` command line: thin click commands over the library, shown with rich."""
