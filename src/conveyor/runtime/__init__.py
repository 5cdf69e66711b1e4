"""How a stage's workers run: one module per runtime behind one interface (`base.Runtime`)."""
