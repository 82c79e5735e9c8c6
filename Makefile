# The two commands the README opens with; both set everything up from nothing.
.PHONY: demo test setup lint bench image

demo:            ## set up, then run the main job on the shipped sample data
	scripts/setup.sh
	scripts/demo.sh

test:            ## set up (plus test-only system packages), then run the whole test suite
	scripts/setup.sh --test
	.venv/bin/ruff check geoiso_dagster tests examples
	.venv/bin/python -m pytest

setup:
	scripts/setup.sh --test

lint:
	.venv/bin/ruff check geoiso_dagster tests examples
	.venv/bin/ruff format --check geoiso_dagster tests examples

image:           ## build geoiso-dagster:latest, the image of every run container (README, Deploy)
	scripts/image.sh
