"""The experiment configs (`--config NAME`); `common` holds the recipe they share."""
