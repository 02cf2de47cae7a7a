"""The calibration control room: ``calloop web``, a live web page over the loop's
journals, status files, calibration store and conditions DB (:mod:`loop.web.app`), and
the payload plots it shares with ``calloop plot`` (:mod:`loop.web.plots`)."""
