"""Building zone as a 2R2C thermal network (reference model ``thermal_rc``).

    dT_in/dt = (T_m - T_in)/(R_im C_in) + (T_out - T_in)/(R_io C_in) + (Q_h + f_sol Q_sol)/C_in
    dT_m/dt  = (T_in - T_m)/(R_im C_m)  + (T_out - T_m)/(R_mo C_m)

Linear in the state, observed through ``T_in``. With the typical parameters the state matrix has
eigenvalues -3.22e-4 and -1.32e-5 1/s (time constants 3.1e3 s and 7.6e4 s; the fast one is shorter
than R_im C_in = 4000 s because the air also loses heat outdoors). RK4 is stable while dt |lambda|
stays under 2.785 for every eigenvalue, i.e. for dt < 2.785 / 3.22e-4 = ~8.7e3 s (a 9000 s step
diverges), and accurate to < 1e-6 relative for dt <= 600 s; the reference step is 60 s.
"""

from __future__ import annotations

from raytwin.models import Input, Model, Output, Param, State


def _coefficients(p):
    c_in, c_m, r_im, r_mo, r_io, f_sol = p
    inv_c_in = 1.0 / c_in
    return (inv_c_in / r_im, inv_c_in / r_io, inv_c_in, 1.0 / (r_im * c_m), 1.0 / (r_mo * c_m), f_sol)


def _derivative(x, u, c):
    t_in, t_m = x
    t_out, q_h, q_sol = u
    a_im_in, a_io_in, inv_c_in, a_im_m, a_mo_m, f_sol = c
    d_in = a_im_in * (t_m - t_in) + a_io_in * (t_out - t_in) + inv_c_in * (q_h + f_sol * q_sol)
    d_m = a_im_m * (t_in - t_m) + a_mo_m * (t_out - t_m)
    return (d_in, d_m)


def _output(x, u, c):
    return (x[0],)


THERMAL_RC = Model(
    name="thermal_rc",
    version="1.0.0",
    description="Building zone, 2R2C thermal network (indoor air + building mass).",
    states=(
        State("T_in", "K", "indoor air temperature", 173.15, 473.15, nominal=293.15, prior_std=2.0, process_std=1e-2),
        State("T_m", "K", "building mass temperature", 173.15, 473.15, nominal=293.15, prior_std=2.0,
              process_std=1e-3),
    ),
    inputs=(
        Input("T_out", "K", "outdoor temperature", 173.15, 373.15, nominal=283.15),
        Input("Q_h", "W", "heating power (negative: cooling)", -1.0e8, 1.0e8, nominal=0.0),
        Input("Q_sol", "W", "solar irradiance gain", 0.0, 1.0e8, nominal=0.0),
    ),
    params=(
        Param("C_in", "J/K", 2.0e6, 1.0e5, 1.0e8, "indoor air + furniture heat capacity"),
        Param("C_m", "J/K", 2.0e7, 1.0e6, 1.0e9, "building mass heat capacity"),
        Param("R_im", "K/W", 2.0e-3, 1.0e-5, 1.0, "air-to-mass resistance"),
        Param("R_mo", "K/W", 5.0e-3, 1.0e-5, 1.0, "mass-to-outdoor resistance"),
        Param("R_io", "K/W", 1.0e-2, 1.0e-5, 1.0, "air-to-outdoor resistance (windows, ventilation)"),
        Param("f_sol", "-", 0.3, 0.0, 1.0, "fraction of solar gain reaching the indoor air"),
    ),
    outputs=(Output("T_in", "K", "indoor air temperature", 173.15, 473.15, measurement_std=0.05),),
    coefficients=_coefficients,
    derivative=_derivative,
    output=_output,
    default_dt=60.0,
    dt_limit="stable for dt < 2.785/|lambda_max| of the state matrix (~8.7e3 s typical); "
             "accurate (<1e-6 rel.) for dt <= 600 s",
)
