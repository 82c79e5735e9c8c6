"""Stand-in task modules: worker functions the tests name in place of the built-in
tasks (hanging, lying, failing on purpose) or as a team's own steps. No test lives here."""
