"""secfed.cli -- the thin click front end: parse, call one library function, print."""
