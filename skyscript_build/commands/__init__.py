"""One module per subcommand of ``skyscript-build`` (see ``skyscript_build.cli``)."""
