"""`python -m mergejax.recipe RECIPE.yml --out-dir DIR`: see `mergejax.recipe.cli`."""

import sys

from mergejax.recipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
