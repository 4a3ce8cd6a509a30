-- Pandoc filter for the book (markdown written by book/build.py -> typst).
--
-- * Header identifiers repeat across chapters ("exercises"), and typst labels must be unique, so
--   they are dropped: the book refers to figures, never to headings, by label.
-- * Math is converted here, one formula at a time, so that what pandoc's typst writer prints
--   badly can be repaired precisely; book/build.py lints the result.

function Header(h)
  h.identifier = ""
  return h
end

-- LaTeX that the writer mishandles, rewritten before it converts the formula.
local function clean_tex(t)
  -- \mathrm{softmax} becomes upright(s o f t m a x) (spaced letters); \operatorname gives a name.
  t = t:gsub("\\mathrm{(%a%a+)}", "\\operatorname{%1}")
  -- \! (a negative thin space) comes out as #h(-1em), which prints over its neighbours.
  t = t:gsub("\\!", "")
  -- \big( and friends come out with stray space; typst sizes delimiters by itself.
  t = t:gsub("\\[bB]igg?[lr]?(%A)", "%1")
  return t
end

-- Typst that the writer prints badly, repaired after it converts the formula.
local function fix_typst(s)
  -- An operator name comes out as a bare string, which typst sets as text followed by a space
  -- ("softmax (z)"); as op("softmax") it is an operator ("softmax(z)").
  s = (" " .. s):gsub('([^%w%.%(])"(%a%w*)"', '%1op("%2")'):sub(2)
  -- cases() loses the gap between a value and its condition.
  if s:find("cases%(") then
    s = s:gsub(" & ", " & quad ")
  end
  return s
end

function Math(m)
  local tex = clean_tex(m.text)
  local doc = pandoc.Pandoc({ pandoc.Plain({ pandoc.Math(m.mathtype, tex) }) })
  local typ = pandoc.write(doc, "typst"):gsub("%s+$", "")
  return pandoc.RawInline("typst", fix_typst(typ))
end

-- The markdown reader makes "chapter 06's" a right single quote, which the typst writer prints as
-- "'" and typst's smart quotes then set after a digit as an accent-like prime. Emitted raw, the
-- right single quote prints as the apostrophe the text means.
function Str(s)
  if not s.text:find("%d\u{2019}") then
    return nil
  end
  local out, rest = {}, s.text
  while true do
    local i, j = rest:find("%d\u{2019}")
    if not i then
      break
    end
    table.insert(out, pandoc.Str(rest:sub(1, i)))
    table.insert(out, pandoc.RawInline("typst", "\u{2019}"))
    rest = rest:sub(j + 1)
  end
  if rest ~= "" then
    table.insert(out, pandoc.Str(rest))
  end
  return out
end

-- A figure's caption can run to several sentences; the list of figures shows only its first. The
-- caption becomes both, and the template's `in-outline` state says which one is being set.
local ABBREVIATIONS = { ["e.g."] = true, ["i.e."] = true, ["al."] = true, ["vs."] = true, ["cf."] = true }

local function first_sentence(inlines)
  local short = pandoc.List()
  for i, el in ipairs(inlines) do
    short:insert(el)
    local nxt = inlines[i + 1]
    if el.t == "Str" and el.text:match("%.$") and not ABBREVIATIONS[el.text]
        and (nxt == nil or nxt.t == "Space" or nxt.t == "SoftBreak") then
      return short, i < #inlines
    end
  end
  return short, false
end

function Figure(f)
  local blocks = f.caption.long
  if #blocks ~= 1 or (blocks[1].t ~= "Plain" and blocks[1].t ~= "Para") then
    return nil
  end
  local long = blocks[1].content
  local short, shorter = first_sentence(long)
  if not shorter then
    return nil
  end
  local both = pandoc.List({ pandoc.RawInline("typst", "#context if in-outline.get() [") })
  both:extend(short)
  both:insert(pandoc.RawInline("typst", "] else ["))
  both:extend(long)
  both:insert(pandoc.RawInline("typst", "]"))
  f.caption.long = { pandoc.Plain(both) }
  return f
end
