"""FIFO lots by hand: each case's expected lots are computed on paper from the lot rules
(CONTRACT.md, "Money"), then a property: for any fills, realized P&L less the open lots' cost
equals the fills' cash flows, and the lots' fees add up to the fills' fees."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

from hypothesis import given, settings
from hypothesis import strategies as st

from etl.money.fifo import Lot, LotFill, Settled, lots_of

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def fill(n: int, side: str, count: str, yes_price: str, fee: str = "0") -> LotFill:
    """Fill number ``n`` (its time: n minutes after T0) adding ``count`` contracts of ``side``
    at a YES price of ``yes_price``."""
    return LotFill(f"f{n}", T0 + timedelta(minutes=n), side, D(count), D(yes_price), D(fee))


def row(lot: Lot) -> tuple[object, ...]:
    return (
        lot.side,
        lot.quantity,
        lot.entry_price,
        lot.exit_price,
        lot.close_type,
        lot.realized_without_fees,
        lot.open_fees,
        lot.close_fees,
        lot.realized_with_fees,
    )


def test_buy_then_sell_is_one_lot_at_the_two_prices_less_both_fees():
    # Selling YES at 0.65 is adding NO at a YES price of 0.65 (NO costs 0.35).
    lots = lots_of([fill(1, "yes", "10", "0.40", "0.07"), fill(2, "no", "10", "0.65", "0.07")])
    assert [row(x) for x in lots] == [
        ("yes", D(10), D("0.40"), D("0.65"), "trade", D("2.5"), D("0.07"), D("0.07"), D("2.36"))
    ]


def test_buying_the_other_side_closes_the_side_held_at_one_minus_its_price():
    # YES 5 at 0.30, then NO 3 at a YES price of 0.50 (NO costs 0.50): 3 YES exit at 0.50.
    lots = lots_of([fill(1, "yes", "5", "0.30"), fill(2, "no", "3", "0.50")])
    assert [row(x) for x in lots] == [
        ("yes", D(3), D("0.30"), D("0.50"), "trade", D("0.6"), 0, 0, D("0.6")),
        ("yes", D(2), D("0.30"), None, None, None, 0, 0, None),
    ]
    assert lots[1].close_time is None and lots[1].signed_quantity == 2


def test_a_short_holds_no_at_no_prices():
    # NO 4 at a YES price of 0.70 enters NO at 0.30; YES 4 at 0.60 exits NO at 0.40.
    lots = lots_of([fill(1, "no", "4", "0.70"), fill(2, "yes", "4", "0.60")])
    assert [row(x) for x in lots] == [
        ("no", D(4), D("0.30"), D("0.40"), "trade", D("0.4"), 0, 0, D("0.4"))
    ]


def test_partial_closes_split_a_closing_fill_over_two_opening_fills():
    lots = lots_of(
        [fill(1, "yes", "3", "0.20"), fill(2, "yes", "2", "0.30"), fill(3, "no", "4", "0.50")]
    )
    assert [(x.opened_by, x.closed_by, x.quantity, x.realized_without_fees) for x in lots] == [
        ("f1", "f3", D(3), D("0.9")),
        ("f2", "f3", D(1), D("0.2")),
        ("f2", None, D(1), None),
    ]


def test_a_fill_that_closes_and_opens_flips_the_position():
    lots = lots_of([fill(1, "yes", "2", "0.40"), fill(2, "no", "5", "0.50")])
    assert [(x.side, x.quantity, x.entry_price, x.exit_price) for x in lots] == [
        ("yes", D(2), D("0.40"), D("0.50")),
        ("no", D(3), D("0.50"), None),
    ]


def test_a_settlement_closes_what_remains_at_the_sides_payout():
    settled = T0 + timedelta(days=1)
    yes_lot = [fill(1, "yes", "2", "0.40")]
    no_lot = [fill(1, "no", "2", "0.60")]  # NO entered at 0.40
    at_half = Settled(settled, D("0.50"))  # a scalar result of 50 cents
    assert [row(x) for x in lots_of(yes_lot, at_half)] == [
        ("yes", D(2), D("0.40"), D("0.50"), "settlement", D("0.2"), 0, 0, D("0.2"))
    ]
    assert [row(x) for x in lots_of(no_lot, at_half)] == [
        ("no", D(2), D("0.40"), D("0.50"), "settlement", D("0.2"), 0, 0, D("0.2"))
    ]
    assert lots_of(yes_lot, Settled(settled, D(0)))[0].realized_without_fees == D("-0.8")
    assert lots_of(no_lot, Settled(settled, D(0)))[0].realized_without_fees == D("1.2")
    assert lots_of(yes_lot, Settled(settled, D(1)))[0].close_time == settled


def test_fees_split_by_quantity_half_even_the_last_lot_taking_the_remainder():
    lots = lots_of(
        [
            fill(1, "yes", "3", "0.50", "0.10"),  # opens three lots of 1
            fill(2, "no", "1", "0.60", "0.01"),
            fill(3, "no", "1", "0.70", "0.02"),
        ]
    )
    assert [(x.open_fees, x.close_fees) for x in lots] == [
        (D("0.033333"), D("0.01")),
        (D("0.033333"), D("0.02")),
        (D("0.033334"), D(0)),  # still open: last in FIFO order
    ]
    assert sum(x.open_fees + x.close_fees for x in lots) == D("0.13")


def test_fractional_contracts():
    lots = lots_of([fill(1, "yes", "2.50", "0.40"), fill(2, "no", "1.25", "0.60", "0.03")])
    assert [(x.quantity, x.realized_without_fees, x.close_fees) for x in lots] == [
        (D("1.25"), D("0.25"), D("0.03")),
        (D("1.25"), None, D(0)),
    ]


def test_fills_match_in_created_time_then_fill_id_bytewise_order():
    same = T0 + timedelta(minutes=1)
    fills = [
        LotFill("b", same, "yes", D(1), D("0.20"), D(0)),
        LotFill("B", same, "yes", D(1), D("0.30"), D(0)),  # "B" < "b" bytewise
        fill(2, "no", "1", "0.50"),
    ]
    assert lots_of(fills)[0].opened_by == "B"


@st.composite
def fill_sequences(draw: st.DrawFn) -> list[LotFill]:
    size = draw(st.integers(min_value=1, max_value=25))
    fills = []
    for n in range(size):
        fills.append(
            LotFill(
                f"f{n:03d}",
                T0 + timedelta(seconds=draw(st.integers(0, 50))),
                draw(st.sampled_from(["yes", "no"])),
                D(draw(st.integers(1, 1000))) / 100,
                D(draw(st.integers(1, 99))) / 100,
                D(draw(st.integers(0, 500))) / 10000,
            )
        )
    return fills


@settings(max_examples=150, deadline=None)
@given(fill_sequences())
def test_realized_less_open_cost_equals_the_cash_flows_and_fees_are_conserved(fills):
    lots = lots_of(fills)
    realized = sum((x.realized_without_fees or D(0) for x in lots), D(0))
    open_cost = sum((x.quantity * x.entry_price for x in lots if x.exit_price is None), D(0))
    # Money rules: adding a side at p pays p per contract; each pair closed pays back $1.
    closed = sum((x.quantity for x in lots if x.exit_price is not None), D(0))
    cash = -sum((f.count * f.price for f in fills), D(0)) + closed
    assert realized - open_cost == cash
    assert sum((x.open_fees + x.close_fees for x in lots), D(0)) == sum(f.fee_cost for f in fills)
    position = sum((f.count if f.outcome_side == "yes" else -f.count for f in fills), D(0))
    assert sum((x.signed_quantity for x in lots if x.exit_price is None), D(0)) == position
