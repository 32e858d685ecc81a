"""The money: FIFO lots (fifo, lots), the cash check (books) and the HTML report (report)."""
