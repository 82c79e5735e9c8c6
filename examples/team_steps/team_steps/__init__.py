"""A team's own geo steps on geoiso-dagster: copy this package to start yours."""
