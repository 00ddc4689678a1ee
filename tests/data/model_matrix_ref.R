# Oracle for tests/test_formula.py: R's model.matrix column names and values for a few formulas
# on 96 rows (4 prompts per task) of tests/data/beta_panel.csv. Run from the repository root:
#   Rscript tests/data/model_matrix_ref.R
suppressPackageStartupMessages({library(splines); library(jsonlite)})
d <- read.csv("tests/data/beta_panel.csv", stringsAsFactors = FALSE)
d <- d[as.integer(sub(".*-p", "", d$prompt)) < 4, ]  # 4 prompts per task, 96 rows
d$variant <- factor(d$variant, levels = c("base", "instruct"))
d$task <- factor(d$task); d$family <- factor(d$family)
formulas <- c(
  "~ R_sc * variant + ns(invN_sc, df = 4) * variant + task",
  "~ variant * task + ns(invN_sc, df = 3) + R_sc * variant + family",
  "~ family * task + ns(invN_sc, df = 2):family",
  "~ invN_sc + ns(R_sc, df = 3) * family - 1"
)
out <- lapply(formulas, function(f) {
  m <- model.matrix(as.formula(f), d)
  list(formula = f, names = colnames(m), values = unname(m))
})
writeLines(toJSON(out, digits = NA, matrix = "rowmajor"), "tests/data/model_matrix_reference.json")
