"""`python -m mergekit_fisher ...`, also what `accelerate launch -m mergekit_fisher compute ...`
runs."""

from mergekit_fisher.cli import main

if __name__ == "__main__":
    main(prog_name="mergekit-fisher")
