"""mole's compute: each stage is a plain function, runnable locally under Pipes or on Modal."""
