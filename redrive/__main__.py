from redrive.cli import app

app()
