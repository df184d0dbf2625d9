"""Test doubles of outside systems (an IB gateway speaking the TWS API); never for production."""
