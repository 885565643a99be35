from fedsilo.cli import app

app(prog_name="fedsilo")
