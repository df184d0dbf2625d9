"""The `ibkr` adapter: Interactive Brokers TWS / IB Gateway through ib_async."""
