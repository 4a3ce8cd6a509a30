-- Pandoc filter for the book: turns notebook cells into plain book blocks for the typst writer.
--
-- * Markdown cells arrive wrapped in Div("cell markdown"); pandoc's typst writer would emit each
--   as #block[...], and a chapter's page break inside such a block fails. We unwrap them.
-- * Code cells keep their source (a python code block) and their outputs (plain code blocks,
--   which the template styles as output) but lose the wrapping blocks.
-- * Header identifiers repeat across chapters ("exercises"), so we drop them: typst labels must
--   be unique only where referenced, and nothing references them.
-- * Images get a width so that a figure never runs off the page.
-- * A few LaTeX constructs that pandoc's typst math writer renders badly are rewritten.

local function unwrap(div)
  if div.classes:includes("cell") or div.classes:includes("output") then
    return div.content
  end
end

function Header(h)
  h.identifier = ""
  return h
end

function Image(img)
  if not img.attributes.width then
    img.attributes.width = "80%"
  end
  return img
end

function Math(m)
  -- \mathrm{softmax} becomes upright(s o f t m a x) (spaced letters); \operatorname gives op("...").
  m.text = m.text:gsub("\\mathrm{(%a%a+)}", "\\operatorname{%1}")
  return m
end

-- The build marks each chapter's start with <!-- minillm-chapter: N -->; the template numbers
-- chapters from this counter (see template.typ).
function RawBlock(raw)
  local n = raw.text:match("^<!%-%- minillm%-chapter: (%d+) %-%->$")
  if n then
    return pandoc.RawBlock("typst", "#counter(heading).update(" .. n .. ")")
  end
end

function Para(p)
  -- A paragraph that holds only an image is a figure: center it on its own line.
  if #p.content == 1 and p.content[1].t == "Image" then
    return { pandoc.RawBlock("typst", "#align(center)["), p, pandoc.RawBlock("typst", "]") }
  end
end

return {
  { Math = Math, Image = Image, Header = Header },
  { Para = Para, RawBlock = RawBlock },
  { Div = unwrap },
}
