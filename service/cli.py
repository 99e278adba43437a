import click


@click.group()
def main():
    """alexnetd: train AlexNet (NIPS 2012) with a four-stage input pipeline."""
