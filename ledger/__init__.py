"""knowledger.ledger"""
