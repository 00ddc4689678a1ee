# Oracle: fit the published specification with glmmTMB on tests/data/beta_panel.csv and write
# tests/data/glmmtmb_result.json (the `canopy regress --json` layout). Also stores R's ns()
# bases for tests/test_splines.py in tests/data/ns_reference.json.
# Run from the repository root: Rscript tests/data/glmmtmb_fit.R
suppressPackageStartupMessages({library(glmmTMB); library(splines); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
csv <- if (length(args) >= 1) args[1] else "tests/data/beta_panel.csv"
out <- if (length(args) >= 2) args[2] else "tests/data/glmmtmb_result.json"
d <- read.csv(csv, stringsAsFactors = FALSE)
d$variant <- factor(d$variant, levels = c("base", "instruct"))
d$task <- factor(d$task); d$family <- factor(d$family); d$prompt <- factor(d$prompt)
t0 <- proc.time()
fit <- glmmTMB(D ~ R_sc * variant + ns(invN_sc, df = 4) * variant + task + (1 | prompt) + (1 | family),
               dispformula = ~ variant * task + ns(invN_sc, df = 3) + R_sc * variant + family,
               family = beta_family(), data = d)
el <- proc.time() - t0
elapsed <- el[["elapsed"]]
cpu <- el[["user.self"]] + el[["sys.self"]]
tab <- function(m) {
  res <- list()
  for (i in seq_len(nrow(m))) res[[rownames(m)[i]]] <- list(estimate = m[i, 1], se = m[i, 2], z = m[i, 3], p = m[i, 4])
  res
}
s <- summary(fit)
vc <- VarCorr(fit)$cond
re_sd <- lapply(vc, function(v) attr(v, "stddev")[[1]])
par <- fit$fit$par
res <- list(
  mean = tab(s$coefficients$cond), precision = tab(s$coefficients$disp), re_sd = re_sd,
  loglik = as.numeric(logLik(fit)), aic = AIC(fit), nobs = nobs(fit),
  ngroups = as.list(sapply(ranef(fit)$cond, nrow)),
  max_abs_gradient = max(abs(fit$obj$gr(par))), pdHess = fit$sdr$pdHess,
  fit_seconds = elapsed, fit_cpu_seconds = cpu, glmmTMB_version = as.character(packageVersion("glmmTMB")),
  R_version = R.version.string)
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), out)
cat("wrote", out, "in", elapsed, "s\n")

# ns() reference bases, including extrapolation outside the boundary knots
set.seed(7)
cases <- list(
  list(x = c(0.3, 1.2, -0.5, 2.2, 0.9, 1.7, -1.1, 0.0, 0.45, 3.1), df = 4,
       new = c(-3, -1.1, 0.5, 3.1, 5)),
  list(x = round(rnorm(50), 3), df = 3, new = c(-4, -2.5, 0, 2.5, 4)),
  list(x = c(1, 1, 2, 2, 3, 5, 8, 13, 21), df = 5, new = c(0, 1, 4.5, 21, 30)),
  list(x = seq(0, 1, length.out = 11), df = 1, new = c(-0.5, 0.5, 1.5)),
  list(x = exp(rnorm(40)), df = 6, new = c(0.01, 1, 10))
)
ns_out <- lapply(cases, function(cs) {
  b <- ns(cs$x, df = cs$df)
  list(x = cs$x, df = cs$df, new = cs$new, knots = unname(attr(b, "knots")),
       boundary = unname(attr(b, "Boundary.knots")), basis = unname(unclass(b)[, , drop = FALSE]),
       new_basis = unname(predict(b, cs$new)))
})
writeLines(toJSON(ns_out, digits = NA, matrix = "rowmajor"), sub("glmmtmb_result.json", "ns_reference.json", out))
