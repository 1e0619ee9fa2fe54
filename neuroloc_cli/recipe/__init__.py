"""Recipes: YAML → validated, frozen models; parameter forms and precedence."""
